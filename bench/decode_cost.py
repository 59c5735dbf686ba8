"""Peak memory and time of decoding one image as global_descriptor_from_bytes does, per format.

For each format and encoding (baseline and progressive JPEG, 4:2:0 and 4:4:4; PNG and
interlaced PNG; WebP lossy and lossless; GIF; 24-bit BMP) an image of `--megapixels` is
encoded with Pillow, then
a fresh process decodes it to RGB (`tf.io.decode_image`, a JPEG's size first read by
`tf.io.extract_jpeg_shape`) and resizes it to `--max_image_size` on the longer side
(antialiased bilinear), the work before the network. The figure is the peak resident memory
of that call alone: VmHWM after resetting it through /proc/self/clear_refs, minus the RSS
before (the input bytes are already loaded). Memory is linear in the pixels plus the fixed
resize output, so the slope between two sizes is the per-megapixel cost, and the cost at the
export's max_decoded_pixels is extrapolated along that line. Arithmetic-coded JPEG is not
measured: Pillow cannot write it.

    python bench/decode_cost.py --megapixels=4,16 [--formats=jpeg,png,...]

Prints one line per case and a table (MB, seconds, MB per MP from the slope, MB at the cap).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags, logging
from PIL import Image

FLAGS = flags.FLAGS
flags.DEFINE_list("megapixels", ["4", "16"], "Image sizes to measure, in megapixels (square).")
flags.DEFINE_list("formats", ["jpeg", "jpeg_444", "jpeg_progressive", "jpeg_progressive_444",
                              "png", "png_interlaced",
                              "webp_lossy", "webp_lossless", "gif", "bmp"], "Cases to measure.")
flags.DEFINE_integer("max_image_size", 1024, "Longer side after the resize (the export's).")
flags.DEFINE_integer("max_decoded_pixels", 2**27, "The cap the per-MP figure is scaled to.")

_ENCODE = {
    "jpeg": lambda im, out: im.save(out, "JPEG", quality=90),
    "jpeg_progressive": lambda im, out: im.save(out, "JPEG", quality=90, progressive=True),
    # No chroma subsampling: libjpeg keeps 64 2-byte coefficients per 8 x 8 block of each of
    # the 3 components for the whole image (6 bytes per pixel) before the first output row.
    "jpeg_progressive_444": lambda im, out: im.save(out, "JPEG", quality=90, progressive=True,
                                                    subsampling=0),
    "jpeg_444": lambda im, out: im.save(out, "JPEG", quality=90, subsampling=0),
    "png": lambda im, out: im.save(out, "PNG", compress_level=1),
    "png_interlaced": lambda im, out: _png_interlaced(im, out),
    "webp_lossy": lambda im, out: im.save(out, "WEBP", quality=80, method=0),
    "webp_lossless": lambda im, out: im.save(out, "WEBP", lossless=True, method=0, quality=0),
    "gif": lambda im, out: im.quantize(64, method=Image.Quantize.FASTOCTREE).save(out, "GIF"),
    "bmp": lambda im, out: im.save(out, "BMP"),
}

_CHILD = r"""
import json, sys, time
import tensorflow as tf

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
warm = open(sys.argv[2], "rb").read()
max_size = int(sys.argv[3])

@tf.function(autograph=False)
def decode_and_resize(data):
    jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
    size = tf.cond(jpeg, lambda: tf.io.extract_jpeg_shape(data)[:2],
                   lambda: tf.constant([0, 0], tf.int32))
    with tf.control_dependencies([size]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.cast(tf.round(hw * max_size / tf.reduce_max(hw)), tf.int32)
    return tf.image.resize(image[tf.newaxis], target, antialias=True)[0]

decode_and_resize(tf.constant(warm))                  # trace and load the kernels
tensor = tf.constant(data)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS:")
start = time.perf_counter()
out = decode_and_resize(tensor).numpy()
seconds = time.perf_counter() - start
print(json.dumps({"mb": (status_kb("VmHWM:") - before) / 1024, "seconds": seconds,
                  "out": list(out.shape)}))
"""


def _png_interlaced(image, out):
    """Pillow writes no interlaced PNG: re-encode its rows as Adam7 passes (filter 0)."""
    import struct
    import zlib

    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
              (0, 1, 2, 2), (1, 0, 2, 1)]
    raw = bytearray()
    for y0, x0, dy, dx in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            rows = np.concatenate([np.zeros((sub.shape[0], 1), np.uint8),
                                   sub.reshape(sub.shape[0], -1)], axis=1)
            raw += rows.tobytes()

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1))
              + chunk(b"IDAT", zlib.compress(bytes(raw), 1)) + chunk(b"IEND", b""))


def _photo(side: int) -> Image.Image:
    """A smooth colour field with noise: compresses like a photo, not like a flat image."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR))
    noise = rng.integers(-12, 13, image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def measure(fmt: str, megapixels: float, folder: str) -> dict:
    side = int(round((megapixels * 1e6) ** 0.5))
    paths = []
    for name, image in (("image", _photo(side)), ("warm", _photo(64))):
        path = os.path.join(folder, f"{fmt}-{name}")
        buf = io.BytesIO()
        _ENCODE[fmt](image, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        paths.append(path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *paths, str(FLAGS.max_image_size)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{fmt} at {megapixels} MP failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(format=fmt, megapixels=side * side / 1e6, bytes=os.path.getsize(paths[0]))
    return result


def main(argv):
    del argv
    cap_mp = FLAGS.max_decoded_pixels / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt in FLAGS.formats:
            for mp in FLAGS.megapixels:
                r = measure(fmt, float(mp), folder)
                logging.info("%s", json.dumps(r))
                rows.append(r)
    print(f"\n| format | MP | file MB | peak MB | s | MB/MP (slope) | MB at {cap_mp:.0f} MP |")
    print("|---|---|---|---|---|---|---|")
    for fmt in FLAGS.formats:
        mine = sorted((r for r in rows if r["format"] == fmt), key=lambda r: r["megapixels"])
        lo, hi = mine[0], mine[-1]
        # The resize output and its buffers are a fixed cost: the slope is the per-MP cost.
        slope = ((hi["mb"] - lo["mb"]) / (hi["megapixels"] - lo["megapixels"])
                 if len(mine) > 1 else float("nan"))
        for r in mine:
            print(f"| {fmt} | {r['megapixels']:.1f} | {r['bytes'] / 2**20:.1f} | "
                  f"{r['mb']:.0f} | {r['seconds']:.2f} | {slope:.2f} | "
                  f"{hi['mb'] + slope * (cap_mp - hi['megapixels']):.0f} |")

if __name__ == "__main__":
    app.run(main)
