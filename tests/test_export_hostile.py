"""Hostile and damaged inputs to the serving signatures: refused cheaply, with the input named.

The header parser (glam_tf.encoded_image) is checked against PIL on generated and real
files; the signatures on a tiny exported model (global average pooling + dense), in this
process and, for the memory bound, in a process of their own.
"""

import io
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import SHARED_DATA
from glam_tf import encoded_image
from glam_tf.config import ExportConfig, contract
from glam_tf.export import serving
from helpers import huge_png

MAX_SIZE = 64
DIM = 8
PHOTOS = SHARED_DATA / "oxford_query_crops"


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
    return tf.function(encoded_image.encoded_image_size, autograph=False,
                       input_signature=[tf.TensorSpec([], tf.string)])


def _parsed(header, data):
    fmt, h, w, end = (int(v) for v in header(tf.constant(data)))
    return encoded_image.FORMAT_NAMES[fmt], h, w, end


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
    cut = encoded_image.first_gif_frame(tf.constant(data + b"garbage"), len(data) - 1).numpy()
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
    assert info["max_images_per_request"] == ExportConfig().max_images_per_request == 8
    assert info["max_scales_per_request"] == ExportConfig().max_scales_per_request == 16


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


# ---- the cost model: counts checked before anything sized by them ------------------------
_COST_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    def cost_mb(call):
        # Writing 5 to clear_refs resets the peak resident memory (VmHWM) to the current RSS,
        # so the peak afterwards is this call's own. (ru_maxrss is reset too, but also keeps
        # the peak seen when any thread exited: not a per-call figure.)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kb("VmRSS:")
        try:
            call()
            error = None
        except tf.errors.InvalidArgumentError as e:
            error = e.message
        return (status_kb("VmHWM:") - before) / 1024, error

    sigs = tf.saved_model.load(sys.argv[1]).signatures
    png = open(sys.argv[2], "rb").read()
    bomb = open(sys.argv[3], "rb").read()
    image = tf.constant(np.full((64, 64, 3), 90, np.uint8))
    def delg(scales, indices):
        scales, indices = tf.constant(scales, tf.float32), tf.constant(indices, tf.int32)
        return lambda: sigs["serving_default"](input_image=image, input_scales=scales,
                                               input_global_scales_ind=indices)
    def from_bytes(images):
        images = tf.constant(images)
        return lambda: sigs["global_descriptor_from_bytes"](image_bytes=images)
    def batched(images):
        images = tf.constant(images)
        return lambda: sigs["batched_global_descriptors"](input_images=images)
    cases = {
        "delg normal": delg([1.0, 0.7071], [0, 1]),
        "delg 50000 scales and indices": delg(np.ones(50000), np.arange(50000)),
        "delg 20000 out-of-range indices": delg([1.0, 0.5], np.full(20000, 7)),
        "delg 16 out-of-range indices": delg(np.ones(16), np.arange(16) + 100),
        "bytes normal": from_bytes([png]),
        "bytes 1000 images": from_bytes([png] * 1000),
        "bytes bomb": from_bytes([bomb]),
        "batched normal": batched(np.zeros((2, 64, 64, 3), np.uint8)),
        "batched over max_batch_pixels": batched(np.zeros((5, 2048, 2048, 3), np.uint8)),
    }
    for name in ("delg normal", "bytes normal", "batched normal"):   # trace and warm
        cases[name]()
    out = {}
    for name, call in cases.items():
        out[name] = cost_mb(call)
    print(json.dumps(out))
""")


def test_each_refusal_costs_less_than_a_normal_request(export_path, tmp_path):
    """Per request, in its own process: the peak RSS increase of the call alone."""
    (tmp_path / "good.png").write_bytes(encode(random_image(48, 64), "PNG"))
    (tmp_path / "bomb.png").write_bytes(huge_png(30000, 30000))
    (tmp_path / "client.py").write_text(_COST_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "client.py", os.path.abspath(export_path),
                           "good.png", "bomb.png"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    expected = {
        "delg 50000 scales and indices": r"at most 16 entries each \(the export setting "
                                         r"max_scales_per_request",
        "delg 20000 out-of-range indices": "max_scales_per_request",
        "delg 16 out-of-range indices": "input_global_scales_ind must index input_scales",
        "bytes 1000 images": r"at most 8 images \(the export setting max_images_per_request\)",
        "bytes bomb": "max_decoded_pixels=134217728",
        "batched over max_batch_pixels": "max_batch_pixels",
    }
    for name, (mb, error) in out.items():
        if name in expected:
            assert error is not None and re.search(expected[name], error), (name, error)
            assert mb < 4, (name, mb, out)
        else:
            assert error is None, (name, error)


def test_request_counts_and_work_are_bounded(model):
    module = serving.build_serving_module(model, max_image_size=MAX_SIZE, max_scaled_pixels=10000,
                                          max_batch_pixels=20000, max_scales_per_request=3,
                                          max_images_per_request=2)
    image = tf.constant(random_image(64, 64))
    delg = lambda scales, indices: module.serving_default(  # noqa: E731
        image, tf.constant(scales, tf.float32), tf.constant(indices, tf.int32))
    rows = delg([1.0, 1.4, 0.7], [2, 0])["global_descriptors"].numpy()
    np.testing.assert_allclose(rows, delg([1.0, 0.7], [1, 0])["global_descriptors"].numpy(),
                               atol=1e-6)
    for scales, indices, match in [
        ([1.0] * 4, [0], r"at most 3 entries each \(the export setting max_scales_per_request; "
                         r"each scale is described once\); received \(scales, indices\):\] "
                         r"\[4\] \[1\]"),
        ([1.0], [0, 0, 0, 0], r"max_scales_per_request.*\[1\] \[4\]"),
        # 90 x 90 + 2 x 83 x 83 = 21878 px > 20000, each under max_scaled_pixels
        ([1.4, 1.3, 1.3], [0, 1, 2], r"the selected scaled images have more than 20000 pixels "
                                      r"in all \(the export setting max_batch_pixels\)"),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            delg(scales, indices)
    png = encode(random_image(60, 64), "PNG")
    assert module.global_descriptor_from_bytes(tf.constant([png] * 2))[
        "global_descriptors"].shape == (2, DIM)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image_bytes may hold at most 2 images \(the export setting "
                             r"max_images_per_request\); send fewer per request. "
                             r"Received:\] \[3\]"):
        module.global_descriptor_from_bytes(tf.constant([png] * 3))


def test_gif_with_thousands_of_extensions_is_read(header):
    # 9000 comment extensions (33 kB) before the image: walked as a whole, not one loop step
    # per block (which made such a file cost 10-28 s); TF reads the same frame.
    gif = encode(random_image(30, 40, seed=3), "GIF")
    head, frame, trailer = gif_parts(gif)
    data = head + b"\x21\xfe\x01c\x00" * 4000 + frame + trailer
    assert Image.open(io.BytesIO(data)).size == (40, 30)
    # giflib (TF's decoder) reads one more size byte after an empty extension's 0 size.
    data = head + b"\x21\xfe\x01c\x00" * 4000 + b"\x21\xfe\x00\x00" * 5000 + frame + trailer
    assert _parsed(header, data) == ("GIF", 30, 40, len(data) - 1)
    np.testing.assert_array_equal(tf.io.decode_gif(data)[0].numpy(),
                                  tf.io.decode_gif(gif)[0].numpy())
    # An empty extension read as PIL does (no extra byte): giflib goes astray, and so does
    # the walk (no first frame found, so the file is refused before decoding).
    astray = head + b"\x21\xfe\x00" + frame + trailer
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_gif(astray)
    assert _parsed(header, astray)[3] == -1
    # an extension chain that runs off the end, or a block that is not an image, has no size
    for broken in (head + b"\x21\xfe\x05ab", head + b"\x21\xfe\x01c\x00\x99" + frame + trailer):
        assert _parsed(header, broken) == ("GIF", 30, 40, -1)   # the screen; no frame


# ---- JPEG: one reading of the header, libjpeg's ------------------------------------------
def _jpeg_segments(data):
    """(SOI, the segments up to and including SOS, the entropy-coded rest) of a JPEG."""
    pos, segments = 2, []
    while True:
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segments.append(data[pos:pos + 2 + length])
        pos += 2 + length
        if segments[-1][1] == 0xDA:
            return data[:2], segments, data[pos:]


def _frame(sof, h, w, marker=0xC0):
    return bytes([0xFF, marker]) + sof[2:5] + struct.pack(">HH", h, w) + sof[9:]


def adversarial_jpegs():
    """name -> (bytes, libjpeg's (h, w) or None when libjpeg refuses the header)."""
    soi, segments, scan = _jpeg_segments(encode(random_image(16, 16, seed=9), "JPEG"))
    sof = next(s for s in segments if s[1] == 0xC0)
    tables = b"".join(s for s in segments if s[1] not in (0xC0, 0xDA))
    sos = segments[-1]
    # 0xFF00 is not a marker to libjpeg (skipped as extraneous bytes, as are the 2 after
    # it): libjpeg reads the 200 x 200 frame header, then an APP1 segment swallows the
    # 16 x 16 one. A walk that reads FF00 as a segment with a length skips the first and
    # reads the second.
    hidden = _frame(sof, 200, 200) + b"\xff\xe1" + struct.pack(">H", 2 + len(sof))
    return {
        "0xFF00 then a hidden frame": (soi + b"\xff\x00" + struct.pack(">H", 2 + len(hidden))
                                       + hidden + sof + tables + sos + scan, (200, 200)),
        "two frame headers (SOF0, SOF2)": (soi + tables + sof + _frame(sof, 200, 200, 0xC2)
                                           + sos + scan, None),
        "extra bytes between segments": (soi + b"".join(s + b"\x12\x34" for s in segments[:-1]
                                                        if s[1] != 0xC0) + sof + sos + scan,
                                         (16, 16)),
        "fill bytes before markers": (soi + b"".join(b"\xff\xff" + s for s in segments[:-1])
                                      + sos + scan, (16, 16)),
    }


@pytest.mark.parametrize("name", sorted(adversarial_jpegs()))
def test_adversarial_jpeg_never_decodes_over_the_cap(model, name):
    data, libjpeg_size = adversarial_jpegs()[name]
    if libjpeg_size is None:
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.extract_jpeg_shape(data)
    else:
        assert tuple(tf.io.extract_jpeg_shape(data).numpy()[:2]) == libjpeg_size
    module = serving.build_serving_module(model, max_image_size=MAX_SIZE,
                                          max_decoded_pixels=10000)
    call = lambda: module.global_descriptor_from_bytes(  # noqa: E731
        tf.constant([data]))["global_descriptors"].numpy()
    if libjpeg_size is None:
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"image_bytes\[0\] could not be decoded as JPEG"):
            call()
    elif libjpeg_size[0] * libjpeg_size[1] > 10000:
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"image_bytes\[0\] is a 200 x 200 JPEG image \(40000 pixels, "
                                 r"as libjpeg reads its header\), over the export setting "
                                 r"max_decoded_pixels=10000"):
            call()
    else:   # decoded as TF decodes it, not refused as damaged
        image = tf.io.decode_jpeg(data, channels=3).numpy()
        np.testing.assert_allclose(call()[0], global_descriptor_of(module, image), atol=1e-6)


def global_descriptor_of(module, image):
    return module.global_descriptor(tf.constant(image))["global_descriptor"].numpy()


def os2_bmp(image):
    """A 24-bit OS/2 BMP (12-byte BITMAPCOREHEADER, 16-bit sizes), bottom-up BGR rows."""
    h, w = image.shape[:2]
    pad = b"\0" * ((4 - (w * 3) % 4) % 4)
    rows = b"".join(image[y, :, ::-1].tobytes() + pad for y in range(h - 1, -1, -1))
    return (b"BM" + struct.pack("<IHHI", 26 + len(rows), 0, 0, 26)
            + struct.pack("<IHHHH", 12, w, h, 1, 24) + rows)


def test_bmp_tf_cannot_read_is_refused_by_its_reason(sig, header):
    image = random_image(40, 50, seed=5)
    one_bit = encode(Image.fromarray(image).convert("1"), "BMP")
    os2 = os2_bmp(image)
    for data in (one_bit, os2):
        assert Image.open(io.BytesIO(data)).size == (50, 40)
        assert _parsed(header, data)[:3] == ("BMP", 40, 50)
        with pytest.raises(tf.errors.InvalidArgumentError, match="Number of channels"):
            tf.io.decode_image(data, channels=3)
    for data, match in [(one_bit, r"image_bytes\[1\] is a BMP with a 40-byte header and 1 bits "
                                  r"per pixel; the TensorFlow BMP decoder reads only Windows BMPs"),
                        (os2, r"image_bytes\[1\] is a BMP with a 12-byte header and 24 bits "
                              r"per pixel.*convert it to PNG")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            from_bytes(sig, [encode(image, "PNG"), data])
    # 8-, 24- and 32-bit Windows BMPs decode
    for mode in ("L", "RGB", "RGBA"):
        data = encode(Image.fromarray(image).convert(mode), "BMP")
        assert from_bytes(sig, [data]).shape == (1, DIM)
