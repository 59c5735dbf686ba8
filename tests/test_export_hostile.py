"""Hostile and damaged inputs to the serving signatures: refused cheaply, with the input named.

The header parser (glam_tf.export.image_header) is checked against PIL on generated and real
files; the signatures on a tiny exported model (global average pooling + dense), in this
process and, for the memory bound, in a process of their own.
"""

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from glam_tf.config import ExportConfig, contract
from glam_tf.export import image_header, serving
from helpers import huge_png

MAX_SIZE = 64
DIM = 8
PHOTOS = pathlib.Path("/work/shared/data/oxford_query_crops")


def random_image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def encode(image, fmt, **kwargs):
    out = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
        out, fmt, **kwargs)
    return out.getvalue()


# ---- crafted files -----------------------------------------------------------------------
def huge_webp(w, h):
    """PIL's 1 x 1 lossless WebP (38 bytes) with its VP8L header set to w x h."""
    data = bytearray(encode(random_image(1, 1), "WEBP", lossless=True))
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def huge_gif(w, h):
    """PIL's 1 x 1 GIF with its logical screen set to w x h (the frame stays 1 x 1)."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def huge_bmp(w, h):
    """A 24-bit top-down BMP header (negative height) declaring w x h, with 16 pixel bytes."""
    info = struct.pack("<IiiHHIIiiII", 40, w, -h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + bytes(16)


def huge_jpeg(w, h):
    """A small baseline JPEG with its SOF0 frame size set to w x h."""
    data = bytearray(encode(random_image(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _colour_table(flags):
    return 3 * (2 << (flags & 7)) if flags & 0x80 else 0


def _skip_sub_blocks(data, pos):
    while data[pos]:
        pos += 1 + data[pos]
    return pos + 1


def gif_parts(data):
    """(header + colour table, frame: its extensions and image, trailer) of a 1-frame GIF."""
    start = 13 + _colour_table(data[10])
    assert data[-1:] == b";"
    return data[:start], data[start:-1], data[-1:]


def reblock_gif(data, size):
    """The same one-frame GIF with its image data re-cut into sub-blocks of `size` bytes."""
    pos = 13 + _colour_table(data[10])
    while data[pos] == 0x21:                     # extensions: introducer, label, sub-blocks
        pos = _skip_sub_blocks(data, pos + 2)
    pos += 10 + _colour_table(data[pos + 9]) + 1   # descriptor, local table, LZW code size
    payload, i = b"", pos
    while data[i]:
        payload += data[i + 1:i + 1 + data[i]]
        i += 1 + data[i]
    chunks = [payload[j:j + size] for j in range(0, len(payload), size)]
    return data[:pos] + b"".join(bytes([len(c)]) + c for c in chunks) + b"\x00" + data[i + 1:]


# ---- header parser vs PIL ----------------------------------------------------------------
@pytest.fixture(scope="module")
def header():
    return tf.function(image_header.encoded_image_size, autograph=False,
                       input_signature=[tf.TensorSpec([], tf.string)])


def _parsed(header, data):
    fmt, h, w, end = (int(v) for v in header(tf.constant(data)))
    return image_header.FORMAT_NAMES[fmt], h, w, end


def _exif_jpeg(image):
    exif = Image.Exif()
    exif[0x010F] = "GLAM test camera"
    exif[0x0110] = "x" * 3000
    return encode(image, "JPEG", exif=exif.tobytes())


def _jpeg_with_big_segments(image, count=3):
    """A JPEG with `count` 60 kB APP2 segments between SOI and the frame header."""
    data = encode(image, "JPEG")
    app = b"\xff\xe2" + struct.pack(">H", 60002) + bytes(60000)
    return data[:2] + app * count + b"\xff\xff\xff" + data[2:]   # and fill bytes


ENCODERS = {
    "PNG": lambda a: encode(a, "PNG"),
    "PNG gray": lambda a: encode(Image.fromarray(a).convert("L"), "PNG"),
    "GIF": lambda a: encode(a, "GIF"),
    "BMP": lambda a: encode(a, "BMP"),
    "WebP lossless": lambda a: encode(a, "WEBP", lossless=True),
    "WebP lossy": lambda a: encode(a, "WEBP", quality=80),
    "WebP alpha (VP8X)": lambda a: encode(Image.fromarray(a).convert("RGBA"), "WEBP"),
    "JPEG": lambda a: encode(a, "JPEG"),
    "JPEG progressive": lambda a: encode(a, "JPEG", progressive=True),
    "JPEG EXIF": _exif_jpeg,
    "JPEG big segments": _jpeg_with_big_segments,
}


@pytest.mark.parametrize("kind", sorted(ENCODERS))
@pytest.mark.parametrize("hw", [(1, 1), (5, 37), (200, 300), (17, 4000), (3001, 2)])
def test_header_size_matches_pil(header, kind, hw):
    data = ENCODERS[kind](random_image(*hw, seed=hw[1]))
    width, height = Image.open(io.BytesIO(data)).size
    fmt, h, w, end = _parsed(header, data)
    assert (fmt, h, w) == (kind.split()[0], height, width)
    assert end == (len(data) - 1 if fmt == "GIF" else -1)    # just before the trailer


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS} not available")
def test_header_size_of_real_photos(header):
    paths = sorted(PHOTOS.glob("*.jpg"))[:20]
    assert paths
    for path in paths:
        data = path.read_bytes()
        width, height = Image.open(io.BytesIO(data)).size
        assert _parsed(header, data)[:3] == ("JPEG", height, width), path.name


def test_header_of_crafted_and_broken_files(header):
    assert _parsed(header, huge_png(30000, 30000))[:3] == ("PNG", 30000, 30000)
    assert _parsed(header, huge_webp(16383, 16383))[:3] == ("WebP", 16383, 16383)
    assert _parsed(header, huge_gif(30000, 30000))[:3] == ("GIF", 30000, 30000)
    assert _parsed(header, huge_bmp(30000, 30000))[:3] == ("BMP", 30000, 30000)
    assert _parsed(header, huge_jpeg(60000, 50000))[:3] == ("JPEG", 50000, 60000)
    png = encode(random_image(20, 30), "PNG")
    jpeg = encode(random_image(20, 30), "JPEG")
    for data, fmt in [(b"", "unknown"), (b"not an image", "unknown"), (png[:20], "PNG"),
                      (jpeg[:100], "JPEG"), (b"GIF89a", "GIF"), (b"RIFF\0\0\0\0WEBPVP8Z", "WebP"),
                      # thousands of empty segments: the walk stops, no size
                      (b"\xff\xd8" + b"\xff\xe0\x00\x02" * 5000 + jpeg[2:], "JPEG"),
                      (b"\xff\xd8" + b"\xff" * 10000 + jpeg[2:], "JPEG")]:
        assert _parsed(header, data)[:3] == (fmt, -1, -1), data[:16]


@pytest.mark.parametrize("size", [1, 7, 255])
def test_gif_first_frame_end_with_any_sub_block_size(header, size):
    # 1-byte sub-blocks: the chain crosses the 64 kB scan chunks many times.
    gif = encode(random_image(300, 400, seed=size), "GIF")
    data = reblock_gif(gif, size)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                          np.asarray(Image.open(io.BytesIO(gif))))
    assert _parsed(header, data) == ("GIF", 300, 400, len(data) - 1)
    cut = image_header.first_gif_frame(tf.constant(data + b"garbage"), len(data) - 1).numpy()
    assert cut == data


# ---- signatures on a tiny exported model -------------------------------------------------
def _tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(DIM)(keras.layers.Rescaling(1 / 255)(x))
    return keras.Model(inputs, keras.layers.UnitNormalization()(x))


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def export_path(model, tmp_path_factory):
    return serving.export_saved_model(model, tmp_path_factory.mktemp("exports"),
                                      max_image_size=MAX_SIZE)


@pytest.fixture(scope="module")
def sig(export_path):
    return tf.saved_model.load(export_path).signatures


def from_bytes(sig, images):
    return sig["global_descriptor_from_bytes"](
        image_bytes=tf.constant(images, tf.string))["global_descriptors"].numpy()


def global_descriptor(sig, image):
    return sig["global_descriptor"](input_image=tf.constant(image))["global_descriptor"].numpy()


def test_limits_are_recorded(export_path):
    info = json.loads((pathlib.Path(export_path) / contract.EXPORT_INFO_FILE).read_text())
    assert info["max_decoded_pixels"] == ExportConfig().max_decoded_pixels == 2**27
    assert info["max_image_bytes"] == ExportConfig().max_image_bytes == 64 * 2**20
    assert info["max_batch_pixels"] == ExportConfig().max_batch_pixels == 2**25


HUGE = {"PNG": lambda: huge_png(30000, 30000), "WebP": lambda: huge_webp(16383, 16383),
        "GIF": lambda: huge_gif(30000, 30000), "BMP": lambda: huge_bmp(30000, 30000),
        "JPEG": lambda: huge_jpeg(60000, 50000)}


@pytest.mark.parametrize("fmt", sorted(HUGE))
def test_huge_declared_canvas_is_refused_with_its_index(sig, fmt):
    good = encode(random_image(60, 64), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"image_bytes\[1\] is a \d+ x \d+ {fmt} image .* over the "
                             rf"export setting max_decoded_pixels=134217728"):
        from_bytes(sig, [good, HUGE[fmt](), good])


def test_bad_image_among_several_is_named(sig):
    good = encode(random_image(60, 64), "PNG")
    jpeg = encode(random_image(60, 64), "JPEG")
    cases = [
        ([good, good, b"not an image"], r"image_bytes\[2\] is not a JPEG, PNG, GIF, BMP or WebP"),
        ([good, b""], r"image_bytes\[1\] is not a JPEG"),
        ([good[:20], good], r"image_bytes\[0\]: could not read the image size from its PNG "
                            r"header"),
        # header fine, data cut: the decoder fails, the index is still named
        ([good, good, good[:len(good) // 2]], r"image_bytes\[2\] could not be decoded as PNG"),
        ([jpeg, jpeg[:300]], r"image_bytes\[1\] could not be decoded as JPEG"),
        ([good, encode(random_image(400, 10), "PNG")],
         r"image_bytes\[1\]: every scaled image side must be at least 32 px"),
    ]
    for images, match in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            from_bytes(sig, images)
    assert from_bytes(sig, [good]).shape == (1, DIM)          # still serving


@pytest.mark.parametrize("kind", ["PNG", "PNG gray", "GIF", "BMP", "WebP lossless",
                                  "WebP alpha (VP8X)"])
def test_lossless_formats_decode_as_pil(sig, kind):
    data = ENCODERS[kind](random_image(70, 90, seed=4))
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_allclose(from_bytes(sig, [data])[0], global_descriptor(sig, rgb),
                               atol=1e-6)


def test_animated_webp_is_refused_by_name(sig):
    frames = [Image.new("RGB", (64, 64), (40 * i, 50, 90)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    good = encode(random_image(60, 64), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image_bytes\[1\] is an animated WebP, which is not supported"):
        from_bytes(sig, [good, out.getvalue()])


def test_byte_limit_is_refused_with_its_index(model):
    module = serving.build_serving_module(model, max_image_size=MAX_SIZE, max_image_bytes=4096)
    small = encode(random_image(60, 64), "JPEG")
    big = encode(random_image(100, 100), "PNG")
    assert len(small) <= 4096 < len(big)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"image_bytes\[1\] has {len(big)} bytes, over the export setting "
                             r"max_image_bytes=4096"):
        module.global_descriptor_from_bytes(tf.constant([small, big]))


def test_empty_requests(sig):
    assert from_bytes(sig, []).shape == (0, DIM)
    out = sig["batched_global_descriptors"](input_images=tf.zeros([0, 64, 64, 3], tf.uint8))
    assert out["global_descriptors"].shape == (0, DIM)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="input_global_scales_ind must select at least one scale"):
        sig["serving_default"](input_image=tf.zeros([64, 64, 3], tf.uint8),
                               input_scales=tf.constant([1.0]),
                               input_global_scales_ind=tf.constant([], tf.int32))


def test_wrong_ranks_say_the_expected_shape(sig):
    # A loaded signature does not enforce its input ranks: the graph does.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input_image must have shape \[H, W, C\] with C 1 \(grayscale\) "
                             r"or 3 \(RGB\); received shape\] \[40 40\]"):
        global_descriptor(sig, np.zeros([40, 40], np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input_image must have shape \[H, W, C\].*\[2 40 40 3\]"):
        sig["serving_default"](input_image=tf.zeros([2, 40, 40, 3], tf.uint8),
                               input_scales=tf.constant([1.0]),
                               input_global_scales_ind=tf.constant([0]))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"input_images must have shape \[B, H, W, C\].*\[4 40 40\]"):
        sig["batched_global_descriptors"](input_images=tf.zeros([4, 40, 40], tf.uint8))


def test_batch_pixels_are_bounded_per_request(model, sig):
    module = serving.build_serving_module(model, max_image_size=MAX_SIZE,
                                          max_scaled_pixels=10000, max_batch_pixels=20000)
    images = np.stack([random_image(64, 64, seed=s) for s in range(3)])
    # 91 x 91 = 8281 px per image at scale sqrt(2): two fit in 20000, three do not.
    assert module.batched_global_descriptors(images[:2])["global_descriptors"].shape == (2, DIM)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"more than 20000 pixels in all \(the export setting "
                             r"max_batch_pixels\)"):
        module.batched_global_descriptors(images)
    # The default: five 2048 x 2048 images (2896 x 2896 at sqrt(2)) exceed 2**25 pixels.
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_batch_pixels"):
        sig["batched_global_descriptors"](input_images=tf.zeros([5, 2048, 2048, 3], tf.uint8))


def animated_gif(first, frames):
    """A GIF whose first frame is `first` (uint8 image) followed by `frames` - 1 copies."""
    head, frame, trailer = gif_parts(encode(first, "GIF"))
    return head + frame * frames + trailer


def test_animated_gif_gives_its_first_frame(sig):
    first = np.asarray(Image.open(io.BytesIO(encode(random_image(64, 90), "GIF"))).convert("RGB"))
    data = animated_gif(first, 5)
    assert Image.open(io.BytesIO(data)).n_frames == 5
    np.testing.assert_allclose(from_bytes(sig, [data])[0], global_descriptor(sig, first),
                               atol=1e-6)


def test_export_limits_are_validated(model, tmp_path):
    for kwargs, match in [
        (dict(max_batch_pixels=2**22), "--max_batch_pixels must be >= max_scaled_pixels"),
        (dict(max_decoded_pixels=0), "--max_decoded_pixels must be a positive integer"),
        (dict(max_image_bytes=2**31), r"--max_image_bytes must be an integer in "
                                      r"\[1, 2147483647\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            serving.export_saved_model(model, tmp_path / "e", **kwargs)
    assert not (tmp_path / "e").exists()


# ---- the memory bound, in a process of its own -------------------------------------------
_CLIENT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    def peak_mb():   # VmHWM: the process's peak resident memory
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    sig = tf.saved_model.load(sys.argv[1]).signatures["global_descriptor_from_bytes"]
    files = json.load(open(sys.argv[2]))
    read = lambda name: open(files[name], "rb").read()
    call = lambda data: sig(image_bytes=tf.constant([data]))["global_descriptors"].numpy()
    good = call(read("good"))
    try:                                   # warm the refusal path too
        call(b"not an image")
    except tf.errors.InvalidArgumentError:
        pass
    out = {"base_mb": peak_mb(), "errors": {}}
    for name in files:
        if name.startswith("huge_"):
            try:
                call(read(name))
                out["errors"][name] = None
            except tf.errors.InvalidArgumentError as e:
                out["errors"][name] = e.message
    out["refused_mb"] = peak_mb()
    out["good_again"] = bool((call(read("good")) == good).all())
    call(read("animated"))
    out["animated_mb"] = peak_mb()
    print(json.dumps(out))
""")


def test_refused_requests_cost_little_memory_in_a_served_model(export_path, tmp_path):
    files = {"good": encode(random_image(48, 64), "PNG"),
             # 40 frames of 2500 x 2500: decoding them all would hold 250 MB of frames
             "animated": animated_gif(np.full((2500, 2500, 3), 90, np.uint8), 40)}
    files.update({f"huge_{fmt}": make() for fmt, make in HUGE.items()})
    paths = {}
    for name, data in files.items():
        paths[name] = str(tmp_path / name)
        pathlib.Path(paths[name]).write_bytes(data)
    (tmp_path / "files.json").write_text(json.dumps(paths))
    (tmp_path / "client.py").write_text(_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "client.py", os.path.abspath(export_path),
                           "files.json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, message in out["errors"].items():
        assert message is not None and "max_decoded_pixels" in message, (name, message)
    assert out["refused_mb"] - out["base_mb"] < 100, out
    assert out["good_again"]
    assert out["animated_mb"] - out["base_mb"] < 100, out


def test_session_loader_runs_from_bytes(sig, export_path, tmp_path):
    # saved_model_cli loads the SavedModel in a TF1 session as TF Serving does: the tf.data
    # decoding loop of global_descriptor_from_bytes must run there too.
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if not cli.is_file():
        pytest.skip(f"{cli} not installed")
    good = [encode(random_image(60, 80, seed=s), fmt) for s, fmt in ((1, "PNG"), (2, "GIF"))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    outputs = {}
    for name, images in (("good", good), ("bad", [good[0], good[0][:300]])):
        array = np.array(images)                 # fixed-width bytes: no pickle needed
        assert list(array) == images
        np.save(tmp_path / f"{name}.npy", array)
        outputs[name] = subprocess.run(
            [sys.executable, str(cli), "run", "--dir", os.path.abspath(export_path),
             "--tag_set", "serve", "--signature_def", "global_descriptor_from_bytes",
             "--inputs", f"image_bytes={name}.npy", "--outdir", name],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert outputs["good"].returncode == 0, outputs["good"].stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "good" / "global_descriptors.npy"),
                               from_bytes(sig, good), atol=1e-6)
    assert outputs["bad"].returncode != 0
    assert "image_bytes[1] could not be decoded as PNG" in outputs["bad"].stderr
