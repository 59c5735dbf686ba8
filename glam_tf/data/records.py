"""TFRecord examples with the DELG feature keys: building them from image bytes and parsing them.

The keys match tensorflow/models research/delf `build_image_dataset.py`, so shards written here
feed DELG-style training code and the other way round:

| key                  | type    | value                                               |
|----------------------|---------|-----------------------------------------------------|
| image/encoded        | bytes   | the original file bytes, not re-encoded             |
| image/id             | bytes   | the GLDv2 image id (16 hex characters)              |
| image/height         | int64   | pixels                                              |
| image/width          | int64   | pixels                                              |
| image/channels       | int64   | channels stored in the file (1 grey, 3 RGB, 4 RGBA/CMYK) |
| image/format         | bytes   | lower-case PIL format name: "jpeg", "png", ...      |
| image/class/label    | int64   | relabelled class 0..N-1                             |
"""

import dataclasses
import io
import re

import tensorflow as tf
from PIL import Image

KEY_ENCODED = "image/encoded"
KEY_ID = "image/id"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_CHANNELS = "image/channels"
KEY_FORMAT = "image/format"
KEY_LABEL = "image/class/label"

FEATURE_SPEC = {
    KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
    KEY_ID: tf.io.FixedLenFeature([], tf.string),
    KEY_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    KEY_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    KEY_CHANNELS: tf.io.FixedLenFeature([], tf.int64),
    KEY_FORMAT: tf.io.FixedLenFeature([], tf.string),
    KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


class UndecodableImageError(ValueError):
    """Raised by `probe_image` for bytes that Pillow cannot open or fully decode."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What `probe_image` learns from an image file: size, channels and format."""

    height: int
    width: int
    channels: int
    format: str


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def image_error_text(error: Exception) -> str:
    """`Type: message` of a decoding error, with Python object reprs (`<_io.BytesIO object at
    0x7f...>`, which Pillow puts in its messages) replaced by `the image bytes`, so reports
    and lists are byte-identical between runs."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('the image bytes', str(error))}"


def probe_image(data: bytes, *, full_decode: bool = True) -> ImageInfo:
    """Reads size, channel count and format of encoded image bytes with Pillow.

    Args:
      data: the encoded file bytes.
      full_decode: also decode every pixel, which catches truncated files (a header-only
        read does not); costs a few milliseconds per photo.

    Returns:
      An `ImageInfo`.

    Raises:
      UndecodableImageError: empty, garbage or truncated bytes, or a zero-sized image.
    """
    if not data:
        raise UndecodableImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if full_decode:
                image.load()
            width, height = image.size
            channels = len(image.getbands())
            fmt = (image.format or "unknown").lower()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImageError(image_error_text(e)) from e
    if width < 1 or height < 1:
        raise UndecodableImageError(f"zero-sized image {width}x{height}")
    return ImageInfo(height=height, width=width, channels=channels, format=fmt)


def make_example(
    *, encoded: bytes, image_id: str, label: int, info: ImageInfo
) -> tf.train.Example:
    """Builds one DELG-keyed `tf.train.Example` holding the original bytes of an image."""

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                KEY_ENCODED: _bytes(encoded),
                KEY_ID: _bytes(image_id.encode("utf-8")),
                KEY_HEIGHT: _int(info.height),
                KEY_WIDTH: _int(info.width),
                KEY_CHANNELS: _int(info.channels),
                KEY_FORMAT: _bytes(info.format.encode("utf-8")),
                KEY_LABEL: _int(label),
            }
        )
    )


def parse_example(serialized: tf.Tensor) -> dict:
    """Parses one serialized DELG example (scalar string tensor) into a dict of tensors.

    Returns:
      dict with the keys of `FEATURE_SPEC`; every value a scalar tensor.
    """
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)
