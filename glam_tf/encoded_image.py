"""The encoded-image rules shared by the input pipeline and the serving signatures.

The size, format and decodability of an encoded image read from its header, in the graph
(no decoding), and a GIF cut to its first frame: `read_header` gathers what both users
check, `decodable` is the pipeline's whole rule.

TensorFlow ops only (tf.strings.substr, tf.io.decode_raw, integer arithmetic), so the
SavedModel signatures that use them run in TF Serving without Python. They read a few bytes
at a time: the cost does not depend on the declared image size, and a hostile file that
declares a huge canvas is refused before a decoder allocates it.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(6)
FORMAT_NAMES = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP")
# The JPEG header walk (segments before the frame header) stops after this many steps: real
# files need tens; a file made of thousands of empty segments is refused instead of costing a
# loop iteration per 2 bytes.
MAX_HEADER_STEPS = 4096
# GIF data sub-blocks are skipped a window at a time (pointer doubling inside the window),
# so the cost is O(bytes), whatever the sub-block sizes; the window grows from 256 bytes to
# 64 kB while a chain goes on.
_GIF_CHUNK = 1 << 16
_GIF_FIRST_WINDOW = 256
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _int(value) -> tf.Tensor:
    return tf.constant(value, tf.int64)


def _read(data: tf.Tensor, pos, n: int) -> tf.Tensor:
    """Bytes [pos, pos + n) of a scalar string as int64 (n,), zero past the end."""
    length = tf.strings.length(data)
    pos = tf.clip_by_value(tf.cast(pos, tf.int32), 0, length)
    raw = tf.io.decode_raw(tf.strings.substr(data, pos, n), tf.uint8)
    raw = tf.pad(raw, [[0, n - tf.size(raw)]])
    return tf.ensure_shape(tf.cast(raw, tf.int64), [n])


def _le(b, i: int, n: int):
    return sum(b[i + k] * (1 << (8 * k)) for k in range(n))


def _be(b, i: int, n: int):
    return sum(b[i + k] * (1 << (8 * (n - 1 - k))) for k in range(n))


def _signed32(x):
    return tf.where(x >= 1 << 31, x - (1 << 32), x)


def _matches(b, offset: int, magic: bytes):
    return tf.reduce_all(tf.equal(b[offset:offset + len(magic)],
                                  tf.constant(list(magic), tf.int64)))


def _jpeg_size(data: tf.Tensor):
    """(height, width) from the first SOFn segment (baseline, progressive, lossless...)."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    sof = tf.constant(_SOF_MARKERS, tf.int64)

    def body(step, pos, h, w, done):
        b = _read(data, pos, 9)
        marker = b[1]
        is_sof = tf.reduce_any(tf.equal(marker, sof))
        standalone = ((marker >= 0xD0) & (marker <= 0xD7)) | tf.equal(marker, 0x01)
        fill = tf.equal(marker, 0xFF)
        # Not a marker, end of image, start of scan before a frame header, or past the end.
        broken = (tf.not_equal(b[0], 0xFF) | tf.equal(marker, 0xD9) | tf.equal(marker, 0xDA)
                  | (pos + 4 > length))
        step_len = tf.where(fill, _int(1), tf.where(standalone, _int(2), 2 + _be(b, 2, 2)))
        found = is_sof & ~broken
        return (step + 1, pos + step_len, tf.where(found, _be(b, 5, 2), h),
                tf.where(found, _be(b, 7, 2), w), found | broken)

    init = (_int(0), _int(2), _int(-1),
            _int(-1), tf.constant(False))
    _, _, h, w, _ = tf.while_loop(
        lambda step, pos, h, w, done: (~done) & (step < MAX_HEADER_STEPS), body, init)
    return h, w


def _skip_sub_blocks(data: tf.Tensor, start) -> tf.Tensor:
    """Position after the chain of GIF data sub-blocks at `start` (-1: it runs off the end).

    A chain is size byte s, s data bytes, next size byte, ..., a 0 size byte. Per window of
    the file, next[i] = i + 1 + byte[i] is followed by doubling (next = next[next], 17
    times), which takes position 0 to the chain's terminator in the window or to its first
    position past it. The window starts at _GIF_FIRST_WINDOW bytes and doubles (up to
    _GIF_CHUNK) while the chain goes on, so a short chain (an extension of a few bytes) costs
    a few hundred bytes of work, not a whole chunk: the walk is linear in the bytes it covers.
    """

    def body(pos, end, window):
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(
            data, tf.cast(tf.minimum(pos, tf.cast(tf.strings.length(data), tf.int64)),
                          tf.int32), window), tf.uint8), tf.int32)
        size = tf.size(raw)
        index = tf.range(size)
        nxt = tf.where(tf.equal(raw, 0), index, index + 1 + raw)
        tail = tf.range(size, size + 257)      # positions past the window stay where they are
        for _ in range(_GIF_CHUNK.bit_length()):
            nxt = tf.gather(tf.concat([nxt, tail], 0), nxt)
        r = tf.cast(tf.concat([nxt, [size]], 0)[0], tf.int64)   # [size]: empty window
        inside = r < tf.cast(size, tf.int64)
        ran_off = ~inside & (size < window)
        end = tf.where(inside, pos + r + 1, tf.where(ran_off, _int(-1), end))
        return pos + r, end, tf.minimum(window * 2, _GIF_CHUNK)

    _, end, _ = tf.while_loop(lambda pos, end, window: tf.equal(end, -2), body,
                              (tf.cast(start, tf.int64), _int(-2),
                               tf.constant(_GIF_FIRST_WINDOW, tf.int32)))
    return end


def _colour_table_size(packed):
    """Bytes of the GIF colour table a packed-fields byte announces (flag 0x80, 3 * 2^(n+1))."""
    n = tf.bitwise.bitwise_and(packed, 7)
    return tf.where(packed >= 0x80, 3 * tf.bitwise.left_shift(_int(2), n), _int(0))


def _skip_extensions(data: tf.Tensor, start) -> tf.Tensor:
    """Position of the first GIF block at or after `start` that is not an extension.

    -1 when the extensions run off the end. Extensions (0x21, label, sub-blocks) are walked
    all at once per window, by pointer doubling over two states per byte: A, a block starts
    here (an extension goes to B after its first sub-block, as giflib reads it; anything
    else stays: the answer); B, a sub-block size byte (0 goes to A after it, s to B s + 1
    bytes on). The window starts at
    _GIF_FIRST_WINDOW bytes and doubles up to _GIF_CHUNK, so thousands of tiny extensions
    cost O(their bytes), not a loop step each.
    """

    def body(pos, state, end, window):
        # The window and 2 bytes more: an extension's first size byte is 2 bytes on.
        ahead = tf.cast(tf.io.decode_raw(tf.strings.substr(
            data, tf.cast(tf.minimum(pos, tf.cast(tf.strings.length(data), tf.int64)),
                          tf.int32), window + 2), tf.uint8), tf.int32)
        size = tf.minimum(tf.size(ahead), window)
        raw = ahead[:size]
        i = tf.range(size)
        # node 2 * i + state; A = 0, B = 1. An extension at i: introducer, label, first size
        # s at i + 2; giflib (DGifSlurp) reads the next size byte at i + 3 + s even when s
        # is 0 (an empty extension), so B continues there in both cases.
        first = tf.concat([ahead[2:], [0, 0]], 0)[:size]
        next_a = tf.where(tf.equal(raw, 0x21), 2 * (i + 3 + first) + 1, 2 * i)
        next_b = tf.where(tf.equal(raw, 0), 2 * (i + 1), 2 * (i + 1 + raw) + 1)
        nxt = tf.reshape(tf.stack([next_a, next_b], axis=1), [-1])
        tail = tf.range(2 * size, 2 * (size + 260))   # nodes past the window stay
        for _ in range(_GIF_CHUNK.bit_length() + 1):
            nxt = tf.gather(tf.concat([nxt, tail], 0), nxt)
        r = tf.concat([nxt, [2 * size + tf.cast(state, tf.int32)]], 0)[
            tf.cast(state, tf.int32)]
        r_pos, r_state = tf.cast(r // 2, tf.int64), tf.cast(r % 2, tf.int64)
        inside = r_pos < tf.cast(size, tf.int64)
        ran_off = ~inside & (size < window)
        end = tf.where(inside, pos + r_pos, tf.where(ran_off, _int(-1), end))
        return pos + r_pos, r_state, end, tf.minimum(window * 2, _GIF_CHUNK)

    _, _, end, _ = tf.while_loop(
        lambda pos, state, end, window: tf.equal(end, -2), body,
        (tf.cast(start, tf.int64), _int(0), _int(-2), tf.constant(_GIF_FIRST_WINDOW, tf.int32)))
    return end


def _gif_first_frame(data: tf.Tensor):
    """(frame height, frame width, end of the first image's data or -1) of a GIF.

    The first block after the extensions must be an image: a 10-byte descriptor, a local
    colour table, the LZW minimum code size, sub-blocks (giflib refuses anything else).
    """
    packed = _read(data, 0, 13)[10]
    pos = _skip_extensions(data, 13 + _colour_table_size(packed))
    b = _read(data, pos, 10)
    is_image = (pos >= 0) & tf.equal(b[0], 0x2C)
    chain = pos + 10 + _colour_table_size(b[9]) + 1
    end = tf.cond(is_image, lambda: _skip_sub_blocks(data, chain), lambda: _int(-1))
    return (tf.where(is_image, _le(b, 7, 2), _int(-1)), tf.where(is_image, _le(b, 5, 2), _int(-1)),
            end)


def encoded_image_size(data: tf.Tensor):
    """Format, height and width an encoded image declares, read from its header.

    Args:
        data: scalar tf.string, the encoded file.

    Returns:
        `(format, height, width, frame_end)` int64 scalars: format one of UNKNOWN, JPEG,
        PNG, GIF, BMP, WEBP (FORMAT_NAMES); height and width -1 when the header is
        truncated or damaged (a negative BMP height, top-down rows, counts as its absolute
        value); for a GIF, height and width cover both the logical screen and the first
        frame (the larger of each), and frame_end is the byte offset just after the first
        image's data (-1 if not found); frame_end is -1 for other formats.
    """
    b = _read(data, 0, 30)
    minus1 = _int(-1)
    is_jpeg = _matches(b, 0, b"\xff\xd8\xff")
    is_png = _matches(b, 0, b"\x89PNG\r\n\x1a\n")
    is_gif = _matches(b, 0, b"GIF87a") | _matches(b, 0, b"GIF89a")
    is_bmp = _matches(b, 0, b"BM")
    is_webp = _matches(b, 0, b"RIFF") & _matches(b, 8, b"WEBP")
    fmt = tf.cast(tf.where(is_jpeg, JPEG, tf.where(is_png, PNG, tf.where(
        is_gif, GIF, tf.where(is_bmp, BMP, tf.where(is_webp, WEBP, UNKNOWN))))), tf.int64)

    def png():
        ok = _matches(b, 12, b"IHDR")
        return tf.where(ok, _be(b, 20, 4), minus1), tf.where(ok, _be(b, 16, 4), minus1)

    def bmp():
        core = tf.equal(_le(b, 14, 4), 12)               # BITMAPCOREHEADER: 16-bit sizes
        h = tf.where(core, _le(b, 20, 2), tf.abs(_signed32(_le(b, 22, 4))))
        w = tf.where(core, _le(b, 18, 2), _signed32(_le(b, 18, 4)))
        return h, w

    def webp():
        vp8 = _matches(b, 12, b"VP8 ") & _matches(b, 23, b"\x9d\x01\x2a")
        vp8l = _matches(b, 12, b"VP8L") & tf.equal(b[20], 0x2F)
        vp8x = _matches(b, 12, b"VP8X")
        # VP8: 14-bit sizes after the start code; VP8L: 14-bit (size - 1) fields packed
        # little-endian after the 0x2F signature; VP8X: 24-bit (canvas size - 1).
        and_ = tf.bitwise.bitwise_and
        h = tf.where(vp8, and_(_le(b, 28, 2), 0x3FFF), tf.where(
            vp8l, 1 + and_(tf.bitwise.right_shift(_le(b, 22, 3), 6), 0x3FFF),
            tf.where(vp8x, 1 + _le(b, 27, 3), minus1)))
        w = tf.where(vp8, and_(_le(b, 26, 2), 0x3FFF), tf.where(
            vp8l, 1 + and_(_le(b, 21, 2), 0x3FFF),
            tf.where(vp8x, 1 + _le(b, 24, 3), minus1)))
        return h, w

    def gif():
        fh, fw, end = _gif_first_frame(data)
        return tf.maximum(_le(b, 8, 2), fh), tf.maximum(_le(b, 6, 2), fw), end

    def with_end(fn):
        return lambda: (*fn(), minus1)

    h, w, end = tf.switch_case(tf.cast(fmt, tf.int32), [
        lambda: (minus1, minus1, minus1), with_end(lambda: _jpeg_size(data)), with_end(png), gif,
        with_end(bmp), with_end(webp)])
    # Sizes the decoders would refuse anyway; also 0 x N (nothing to describe).
    bad = (h < 1) | (w < 1)
    return fmt, tf.where(bad, minus1, h), tf.where(bad, minus1, w), end


def is_animated_webp(data: tf.Tensor) -> tf.Tensor:
    """Whether a WebP file's VP8X header sets the animation flag (scalar bool)."""
    b = _read(data, 0, 21)
    return (_matches(b, 0, b"RIFF") & _matches(b, 8, b"WEBPVP8X")
            & tf.not_equal(tf.bitwise.bitwise_and(b[20], 0x02), 0))


def first_gif_frame(data: tf.Tensor, frame_end) -> tf.Tensor:
    """The GIF cut after its first image's data, with the trailer byte (0x3B) appended.

    TF's GIF decoder (giflib's DGifSlurp) decodes every frame before returning the first
    one; cut, the file has one frame and decodes to the same first frame.
    """
    return tf.strings.join([tf.strings.substr(data, 0, tf.cast(frame_end, tf.int32)), "\x3b"])


def jpeg_size_as_decoded(data: tf.Tensor):
    """(height, width) int64 of a JPEG as its decoder reads them, without decoding pixels.

    tf.io.extract_jpeg_shape runs libjpeg's own jpeg_read_header, the reading that
    tf.io.decode_image then uses: extraneous bytes between segments, fill bytes, 0xFF00
    pairs, every SOFn kind (baseline, extended, progressive, lossless, arithmetic), a second
    frame header. A walk of our own can disagree with libjpeg on crafted marker sequences
    (and did: a 5 kB file read as 16 x 16 decoded at 12000 x 12000), so the JPEG size is
    never taken from _jpeg_size for the cap. Raises InvalidArgumentError where libjpeg cannot
    read the header (a damaged file, which it would not decode either).
    """
    shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
    return shape[0], shape[1]


def bmp_decodable(data: tf.Tensor):
    """(whether TF's BMP decoder reads this BMP, header size, bits per pixel) as int64/bool.

    TF's decoder reads a Windows BMP (a 40-byte or longer info header) with 8, 24 or 32 bits
    per pixel. An OS/2 BMP (12-byte core header, 16-bit sizes) is read at the wrong offsets
    and 1- and 4-bit BMPs have no channel count it accepts: they are refused by that reason,
    not as damaged files.
    """
    b = _read(data, 0, 30)
    header_size = _le(b, 14, 4)
    bits = tf.where(tf.equal(header_size, 12), _le(b, 24, 2), _le(b, 28, 2))   # OS/2: at 24
    ok = (header_size >= 40) & tf.reduce_any(tf.equal(bits, tf.constant([8, 24, 32], tf.int64)))
    return ok, header_size, bits



class Header(NamedTuple):
    """What an encoded image's header says, as int64/bool scalars (`read_header`)."""

    format: tf.Tensor          # UNKNOWN, JPEG, PNG, GIF, BMP or WEBP
    height: tf.Tensor          # -1 when unreadable (encoded_image_size)
    width: tf.Tensor
    frame_end: tf.Tensor       # a GIF's first frame's end, else -1
    animated_webp: tf.Tensor   # an animated WebP (TF decodes it only to RGBA, every frame)
    bmp_ok: tf.Tensor          # not a BMP, or one TF's BMP decoder reads
    bmp_header_size: tf.Tensor
    bmp_bits: tf.Tensor

    @property
    def is_gif(self) -> tf.Tensor:
        return tf.equal(self.format, GIF)

    @property
    def is_jpeg(self) -> tf.Tensor:
        return tf.equal(self.format, JPEG)

    @property
    def format_name(self) -> tf.Tensor:
        return tf.gather(FORMAT_NAMES, self.format)

    @property
    def size_readable(self) -> tf.Tensor:
        """The header gave a size (and, for a GIF, found the first frame's end)."""
        return (self.height >= 1) & ~(self.is_gif & (self.frame_end < 0))


def read_header(data: tf.Tensor) -> Header:
    """Everything the decodability rules need from one encoded image (scalar tf.string)."""
    fmt, height, width, frame_end = encoded_image_size(data)
    bmp_ok, bmp_header_size, bmp_bits = bmp_decodable(data)
    return Header(fmt, height, width, frame_end, is_animated_webp(data),
                  tf.not_equal(fmt, BMP) | bmp_ok, bmp_header_size, bmp_bits)


def first_frame(data: tf.Tensor, header: Header, cut) -> tf.Tensor:
    """The bytes to decode: a GIF cut to its first frame where `cut`, else `data` as is."""
    return tf.cond(cut, lambda: first_gif_frame(data, header.frame_end),
                   lambda: tf.identity(data))


def decodable(data):
    """Encoded bytes -> (bytes to decode, fits, pixels): the size is read from the header first.

    `fits` is False for an unknown format, an unreadable header, an animated WebP or a BMP
    TF's decoder does not read, checked by the caller before decoding (with `pixels`
    against its cap); a GIF is cut after its first frame (TF's decoder decodes every frame).
    A JPEG's size is read by libjpeg itself (`jpeg_size_as_decoded`), which raises on a
    header it cannot read.
    """
    header = read_header(data)
    height, width = tf.cond(header.is_jpeg, lambda: jpeg_size_as_decoded(data),
                            lambda: (header.height, header.width))
    readable = ((header.format != UNKNOWN) & (height >= 1)
                & ~(header.is_gif & (header.frame_end < 0))
                & ~header.animated_webp & header.bmp_ok)
    return first_frame(data, header, header.is_gif & readable), readable, height * width
