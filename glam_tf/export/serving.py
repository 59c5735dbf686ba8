"""Serving signatures of the GLAM descriptor model and their SavedModel export.

A `tf.Module` wraps the Keras descriptor model (float32 (B, H, W, 3) RGB in [0, 255] ->
(B, D) unit rows) in four `tf.function`s with fully typed input signatures, so the
SavedModel loads with plain `tf.saved_model.load` or TF Serving, without glam_tf:

- `serving_default` (DELG-compatible): input_image uint8 [H, W, C], input_scales float32 [N],
  input_global_scales_ind int32 [N'] -> global_descriptors float32 [S, D]: one unit row per
  selected scale, in scale-index order, each scale once (as DELG's ExtractGlobalFeatures),
  the image resized to round([H, W] * scale) with bilinear interpolation.
- `global_descriptor`: input_image uint8 [H, W, C] -> global_descriptor float32 [D]: the
  paper's multi-resolution descriptor (GLAM_SPEC "Inference"): longer side resized to
  max_image_size, unit descriptors at the export-time scales averaged, L2-normalised.
- `batched_global_descriptors`: input_images uint8 [B, H, W, C] (same size, already at the
  target size; no longer-side resize) -> global_descriptors float32 [B, D], multi-scale as
  `global_descriptor`, per image; B = 0 gives [0, D].
- `global_descriptor_from_bytes`: image_bytes string [B] (encoded JPEG/PNG/GIF/BMP/WebP) ->
  global_descriptors float32 [B, D], each decoded (a GIF's first frame only) and described as
  `global_descriptor`. It is the signature TF Serving's REST API can feed with base64
  (`{"b64": ...}` works only for DT_STRING inputs).

Training-free inference options (ExportConfig, recorded in glam_export.json): the model's
GeM exponent (`inference_gem_p`) and a regional GeM before it (`regional_gem`), through
glam_tf.model.inference_model; `scale_aggregation` max: the fixed-scale signatures take the
element-wise maximum of the per-scale unit descriptors instead of their mean (then L2).
`serving_default` returns the per-scale rows either way (the client combines them).

The model computes in the export's `precision` (float32, bfloat16 or float16; see
glam_tf.export.precision for what stays float32); every signature's inputs and float32 unit
outputs are the same in every precision.

C may be 1 (grayscale, tiled to RGB) or 3. Bad inputs raise InvalidArgumentError with a
message naming the input (never crash the server), before any large allocation:
- a wrong rank or channel count (the expected shape and the received one);
- a scaled side under `min_image_size` (the backbone needs 32 px), a scaled image over
  `max_scaled_pixels`, a batched request over `max_batch_pixels` (B * h * w at the largest
  scale);
- in `serving_default`, more than `max_scales_per_request` scales or indices, an empty
  `input_global_scales_ind`, scale indices out of range, non-finite or non-positive
  selected scales, selected scaled images over `max_batch_pixels` in all;
- in `global_descriptor_from_bytes`, more than `max_images_per_request` images; naming
  `image_bytes[i]`: a file over
  `max_image_bytes`, an unknown format, an unreadable header, an animated WebP, a size
  (read from the header, encoded_image.encoded_image_size) over `max_decoded_pixels`, data
  the decoder rejects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import uuid
from typing import Optional

import tensorflow as tf
from absl import logging

from glam_tf import cpu, encoded_image, files
from glam_tf.config import ExportConfig, contract
from glam_tf.export import precision as precision_lib
from glam_tf.export import warmup
from glam_tf.model.builder import inference_model

SIGNATURE_NAMES = (
    "serving_default",
    "global_descriptor",
    "batched_global_descriptors",
    "global_descriptor_from_bytes",
)


def export_config(config: Optional[ExportConfig] = None, **settings) -> ExportConfig:
    """`config` (default: ExportConfig()) with `settings` replaced, validated.

    Raises:
        SettingError (a ValueError) naming the setting, the rule and the received value.
    """
    config = config if config is not None else ExportConfig()
    try:
        config = dataclasses.replace(config, **settings)
    except TypeError as e:
        raise TypeError(f"unknown export setting ({e}); the settings are ExportConfig's "
                        f"fields: {', '.join(f.name for f in dataclasses.fields(ExportConfig))}"
                        ) from None
    if settings.get("scales") is not None:
        try:
            config = dataclasses.replace(config, scales=tuple(float(s) for s in config.scales))
        except (TypeError, ValueError):
            pass   # validate() names the bad value
    config.validate()
    return config


def _as_rgb(images: tf.Tensor, input_name: str, layout: str) -> tf.Tensor:
    """Checks rank and channels ([..., C], C 1 or 3); grayscale -> RGB by tiling.

    `layout` names the expected shape in the message, e.g. "[H, W, C]". The signatures'
    static shapes do not bind a caller: a loaded signature accepts any rank, so it is checked.
    """
    rank = images.shape.rank
    message = (f"{input_name} must have shape {layout} with C 1 (grayscale) or 3 (RGB); "
               "received shape")
    ok = tf.equal(tf.rank(images), rank)
    channels = tf.concat([tf.shape(images), tf.zeros([rank], tf.int32)], 0)[rank - 1]
    ok = tf.logical_and(ok, tf.reduce_any(tf.equal(channels, [1, 3])))
    check = tf.debugging.Assert(ok, [message, tf.shape(images)], summarize=8)
    with tf.control_dependencies([check]):
        images = tf.identity(images)
    rgb = tf.cond(tf.equal(tf.shape(images)[-1], 1),
                  lambda: tf.image.grayscale_to_rgb(images),
                  lambda: images)
    return tf.ensure_shape(rgb, images.shape[:-1].concatenate([3]))


def scaled_sizes(hw: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
    """round([H, W] * scale) per scale, in float32 as DELG does; (S,) -> (S, 2) float32."""
    hw = tf.cast(hw, tf.float32)
    return tf.round(hw[tf.newaxis, :] * tf.reshape(scales, [-1, 1]))


def _check_sizes(sizes: tf.Tensor, *, min_size: int, max_pixels: int,
                 what) -> tf.Operation:
    """Asserts every (h, w) row of `sizes` (float32 (S, 2)) is >= min_size and <= max_pixels.

    `what` (str or scalar tf.string) names the input at the start of the message.
    """
    pixels = tf.reduce_prod(tf.cast(sizes, tf.float64), axis=1)
    checks = (
        (tf.reduce_all(sizes >= float(min_size)),
         f": every scaled image side must be at least {min_size} px (the backbone minimum); "
         "use a larger image or larger scales."),
        (tf.reduce_all(pixels <= float(max_pixels)),
         f": a scaled image has more than {max_pixels} pixels (the export setting "
         "max_scaled_pixels); downsize the image or use smaller scales."),
    )
    last = tf.no_op()
    for ok, message in checks:   # in order: the first broken rule is the one reported
        with tf.control_dependencies([last]):
            last = tf.debugging.Assert(
                ok, [tf.strings.join([what, message + " Scaled [height, width] per scale:"]),
                     sizes], summarize=64)
    return last


def _tf_variable(variable) -> tf.Variable:
    """The tf.Variable holding a keras.Variable's value (itself if already a tf.Variable)."""
    if isinstance(variable, tf.Variable):
        return variable
    value = getattr(variable, "value", None)
    if not isinstance(value, tf.Variable):
        raise TypeError(f"model variable {getattr(variable, 'path', variable)!r} is not backed "
                        f"by a tf.Variable (got {type(value).__name__}); export needs the "
                        "TensorFlow backend (KERAS_BACKEND=tensorflow).")
    return value


class GlamServingModule(tf.Module):
    """The four serving signatures around one descriptor model (see the module docstring).

    Args:
        model: keras.Model, float32 (B, H, W, 3) RGB in [0, 255] -> (B, D) unit rows.
        config: the export-time settings (glam_tf.config.ExportConfig: scales, sizes,
            request limits, compute precision); default ExportConfig().
        **settings: ExportConfig fields replaced in `config` (e.g. scales=(1.0,),
            precision="bfloat16").

    With precision bfloat16 or float16 the signatures run a clone of `model` that computes
    in that precision (glam_tf.export.precision.with_precision); inputs and float32 unit
    outputs are the same as in float32.
    """

    def __init__(self, model, config: Optional[ExportConfig] = None, *, name="glam_serving",
                 **settings):
        super().__init__(name=name)
        config = export_config(config, **settings)
        self.config = config
        # bfloat16/float16: a clone computing in that precision (float32 variables, float32
        # softmaxes, GeM and head: glam_tf.export.precision); float32: the model itself.
        model = inference_model(model, gem_p=config.inference_gem_p,
                                regional_gem=config.regional_gem)
        model = precision_lib.with_precision(model, config.precision)
        side = max(config.min_image_size, 64)
        probe = model(tf.zeros([1, side, side, 3]), training=False)
        if probe.shape.rank != 2 or probe.shape[0] != 1:
            raise ValueError(f"model must map (B, H, W, 3) images to (B, D) descriptors; a "
                             f"(1, {side}, {side}, 3) input gave shape {tuple(probe.shape)}.")
        self.descriptor_dim = int(probe.shape[-1])
        # Only the variables are tracked (saved); the Keras model object is kept out of the
        # object graph (a plain closure is not tracked) so loading needs no Keras classes.
        # The tf.Variables inside the keras.Variables are tracked, not the keras.Variables:
        # those export as a second, fresh tf.Variable that the session-based loaders (TF
        # Serving, saved_model_cli) restore while the functions read the first, unrestored one
        # ("Could not find variable ...").
        self.model_variables = [_tf_variable(v) for v in model.variables]
        self._call_model = lambda images: model(images, training=False)

    # ---- graph helpers -------------------------------------------------------------------
    @tf.function(autograph=False,
                 input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def embed(self, images: tf.Tensor) -> tf.Tensor:
        """The model alone: (B, h, w, 3) float32 RGB in [0, 255] -> (B, D) unit rows.

        One traced function that every signature calls, so the model graph is traced and
        stored once (not once per signature); also callable on the loaded object.
        """
        return tf.cast(self._call_model(images), tf.float32)

    def _descriptors_at_sizes(self, images: tf.Tensor, sizes: tf.Tensor) -> tf.Tensor:
        """Bilinear resize of `images` (B, H, W, 3) to each (h, w) of `sizes` (S, 2) and embed.

        `images` may be uint8 (resized without a full-size float copy) or float32.
        Returns (S, B, D). One scale at a time (parallel_iterations=1) bounds peak memory.
        """
        sizes = tf.cast(sizes, tf.int32)
        num = tf.shape(sizes)[0]
        batch = images.shape[0]
        out = tf.TensorArray(tf.float32, size=num,
                             element_shape=tf.TensorShape([batch, self.descriptor_dim]))

        def body(i, out):
            resized = tf.cast(tf.image.resize(images, sizes[i], method="bilinear"), tf.float32)
            return i + 1, out.write(i, self.embed(resized))

        _, out = tf.while_loop(lambda i, _: i < num, body, (tf.constant(0), out),
                               parallel_iterations=1)
        return out.stack()

    def _fixed_scale_sizes(self, hw: tf.Tensor, what):
        sizes = scaled_sizes(hw, tf.constant(self.config.scales, tf.float32))
        check = _check_sizes(sizes, min_size=self.config.min_image_size,
                             max_pixels=self.config.max_scaled_pixels, what=what)
        with tf.control_dependencies([check]):
            return tf.identity(sizes)

    def _resize_longer_side(self, image: tf.Tensor, what) -> tf.Tensor:
        """(H, W, 3) uint8 -> (h, w, 3) float32, longer side = max_image_size (aspect kept).

        Antialiased bilinear (like PIL's BILINEAR resize that image-retrieval code uses
        before the network); target = round([H, W] * max_image_size / max(H, W)), min 1.
        """
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        nonempty = tf.debugging.Assert(tf.reduce_all(hw >= 1.0),
                                       [tf.strings.join([what, " must have height and width "
                                                         ">= 1; received shape"]),
                                        tf.shape(image)])
        with tf.control_dependencies([nonempty]):
            factor = tf.constant(float(self.config.max_image_size), tf.float32) / tf.reduce_max(hw)
        target = tf.maximum(tf.cast(tf.round(hw * factor), tf.int32), 1)
        return tf.image.resize(image[tf.newaxis], target, method="bilinear", antialias=True)[0]

    def _multiscale(self, image: tf.Tensor, what) -> tf.Tensor:
        """(h, w, 3) at its target size -> (D,) mean of the unit descriptors at the scales, L2."""
        sizes = self._fixed_scale_sizes(tf.shape(image)[:2], what)
        descriptors = self._descriptors_at_sizes(image[tf.newaxis], sizes)[:, 0, :]
        return tf.math.l2_normalize(self._aggregate_scales(descriptors))

    def _aggregate_scales(self, descriptors: tf.Tensor) -> tf.Tensor:
        """(S, ..., D) per-scale unit rows -> (..., D) mean or element-wise max (not L2)."""
        if self.config.scale_aggregation == "max":
            return tf.reduce_max(descriptors, axis=0)
        return tf.reduce_mean(descriptors, axis=0)

    def _global_descriptor(self, image: tf.Tensor, what) -> tf.Tensor:
        """(H, W, 3) uint8 -> (D,) multi-scale unit descriptor (GLAM_SPEC "Inference")."""
        return self._multiscale(self._resize_longer_side(image, what), what)

    def _batched(self, images: tf.Tensor) -> tf.Tensor:
        """(B, h, w, 3), B >= 1 -> (B, D); the request is refused over max_batch_pixels."""
        what = "batched_global_descriptors"
        sizes = self._fixed_scale_sizes(tf.shape(images)[1:3], what)
        batch = tf.cast(tf.shape(images)[0], tf.float64)
        pixels = batch * tf.reduce_max(tf.reduce_prod(tf.cast(sizes, tf.float64), axis=1))
        bounded = tf.debugging.Assert(
            pixels <= float(self.config.max_batch_pixels),
            [f"{what}: the images of the request at the largest scale have more than "
             f"{self.config.max_batch_pixels} pixels in all (the export setting max_batch_pixels); send "
             "fewer images per request. input_images shape, pixels in all:",
             tf.shape(images), tf.cast(pixels, tf.int64)])
        with tf.control_dependencies([bounded]):
            descriptors = self._descriptors_at_sizes(images, sizes)
        return tf.math.l2_normalize(self._aggregate_scales(descriptors), axis=-1)

    def _checked_encoded(self, data: tf.Tensor, name: tf.Tensor):
        """One encoded image -> (bytes to decode, format name), refused before decoding.

        Refuses (InvalidArgumentError, message starting with `name`) a file over
        max_image_bytes, an unknown format, an unreadable header, an animated WebP and a
        declared size over max_decoded_pixels. A GIF is cut to its first frame.
        """
        num_bytes = tf.strings.length(data)
        small = tf.debugging.Assert(num_bytes <= self.config.max_image_bytes, [tf.strings.join([
            name, " has ", tf.strings.as_string(num_bytes), " bytes, over the export setting "
            f"max_image_bytes={self.config.max_image_bytes}; downsize or recompress it."])])
        with tf.control_dependencies([small]):
            header = encoded_image.read_header(data)
        format_name = header.format_name
        known = tf.debugging.Assert(tf.not_equal(header.format, encoded_image.UNKNOWN), [
            tf.strings.join([name, " is not a JPEG, PNG, GIF, BMP or WebP file (its first "
                             "bytes match none of their signatures)."])])
        # A JPEG's size is read by libjpeg itself, just before decoding (see `decode`).
        is_jpeg = header.is_jpeg
        readable = tf.debugging.Assert(
            is_jpeg | header.size_readable,
            [tf.strings.join([name, ": could not read the image size from its ", format_name,
                              " header (a truncated or damaged file)."])])
        # TF decodes an animated WebP only to RGBA with every frame; a still one decodes.
        still = tf.debugging.Assert(~header.animated_webp, [tf.strings.join([
            name, " is an animated WebP, which is not supported; send a still image (e.g. "
            "its first frame)."])])
        width, height = header.width, header.height
        pixels = height * width
        within = tf.debugging.Assert(is_jpeg | (pixels <= self.config.max_decoded_pixels), [
            tf.strings.join([
            name, " is a ", tf.strings.as_string(width), " x ", tf.strings.as_string(height),
            " ", format_name, " image (", tf.strings.as_string(pixels), " pixels), over the "
            f"export setting max_decoded_pixels={self.config.max_decoded_pixels}; downsize it before "
                "sending."])])
        bmp = tf.debugging.Assert(header.bmp_ok, [
            tf.strings.join([name, " is a BMP with a ",
                             tf.strings.as_string(header.bmp_header_size),
                             "-byte header and ", tf.strings.as_string(header.bmp_bits),
                             " bits per pixel; the TensorFlow BMP decoder reads only Windows "
                             "BMPs (a header of 40 bytes or more) with 8, 24 or 32 bits per "
                             "pixel (not OS/2 or 1- and 4-bit ones): convert it to PNG."])])
        with tf.control_dependencies([known, readable, still, within, bmp]):
            data = encoded_image.first_frame(data, header, header.is_gif)
        return data, format_name

    # ---- signatures ----------------------------------------------------------------------
    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None], tf.uint8, name="input_image"),
        tf.TensorSpec([None], tf.float32, name="input_scales"),
        tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"),
    ])
    def serving_default(self, input_image, input_scales, input_global_scales_ind):
        """DELG interface: one unit descriptor per selected scale, in scale-index order.

        The counts are checked first; every later tensor is O(scales + indices) and is built
        only after them (control dependencies: a check does not order ops on its own).
        """
        image = _as_rgb(input_image, "input_image", "[H, W, C]")
        num_scales = tf.size(input_scales)
        num_indices = tf.size(input_global_scales_ind)
        limit = self.config.max_scales_per_request
        counts = tf.debugging.Assert(
            (num_scales <= limit) & (num_indices <= limit),
            [f"serving_default: input_scales and input_global_scales_ind may have at most "
             f"{limit} entries each (the export setting max_scales_per_request; each scale is "
             "described once); received (scales, indices):", num_scales, num_indices])
        # No row at all would reach a DELG client as a sum of nothing, normalised: NaN.
        nonempty = tf.debugging.Assert(
            num_indices > 0,
            ["input_global_scales_ind must select at least one scale (a descriptor per "
             "selected scale is returned; none selected gives no descriptor); received []"])
        with tf.control_dependencies([counts, nonempty]):
            indices = tf.identity(input_global_scales_ind)
            in_range = tf.debugging.Assert(
                tf.reduce_all((indices >= 0) & (indices < num_scales)),
                ["input_global_scales_ind must index input_scales (0 <= i < len(input_scales));"
                 " received indices", indices, "for", num_scales, "scales"], summarize=64)
        with tf.control_dependencies([in_range]):
            # selected[i]: whether scale i is indexed, as a scatter (O(scales + indices)).
            selected = tf.tensor_scatter_nd_max(tf.zeros([num_scales], tf.int32),
                                                indices[:, tf.newaxis],
                                                tf.ones_like(indices)) > 0
        scales = tf.boolean_mask(input_scales, selected)
        valid = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(scales) & (scales > 0)),
            ["input_scales selected by input_global_scales_ind must be finite and > 0; "
             "received", input_scales], summarize=64)
        with tf.control_dependencies([valid]):
            sizes = scaled_sizes(tf.shape(image)[:2], scales)
        what = "serving_default (input_image * input_scales)"
        check = _check_sizes(sizes, min_size=self.config.min_image_size,
                             max_pixels=self.config.max_scaled_pixels, what=what)
        with tf.control_dependencies([check]):
            pixels = tf.reduce_sum(tf.reduce_prod(tf.cast(sizes, tf.float64), axis=1))
            work = tf.debugging.Assert(pixels <= float(self.config.max_batch_pixels), [
                f"{what}: the selected scaled images have more than {self.config.max_batch_pixels} "
                "pixels in all (the export setting max_batch_pixels); select fewer or smaller "
                "scales. Scaled [height, width] per scale:", sizes], summarize=64)
        with tf.control_dependencies([work]):
            sizes = tf.identity(sizes)
        descriptors = self._descriptors_at_sizes(image[tf.newaxis], sizes)
        return {"global_descriptors": descriptors[:, 0, :]}

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None], tf.uint8, name="input_image")])
    def global_descriptor(self, input_image):
        """The paper's descriptor of one image: max-size resize, fixed scales, mean, L2."""
        image = _as_rgb(input_image, "input_image", "[H, W, C]")
        return {"global_descriptor": self._global_descriptor(image, "global_descriptor")}

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, None], tf.uint8, name="input_images")])
    def batched_global_descriptors(self, input_images):
        """Same-size images already at their target size -> (B, D), fixed scales per image."""
        images = _as_rgb(input_images, "input_images", "[B, H, W, C]")
        descriptors = tf.cond(tf.shape(images)[0] > 0, lambda: self._batched(images),
                              lambda: tf.zeros([0, self.descriptor_dim]))
        return {"global_descriptors": tf.ensure_shape(descriptors,
                                                      [None, self.descriptor_dim])}

    @tf.function(autograph=False,
                 input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def global_descriptor_from_bytes(self, image_bytes):
        """Encoded images (any size each) -> (B, D), each as `global_descriptor`.

        Every image is checked from its header first (nothing decoded), then they are
        decoded one at a time in a tf.data pipeline whose ignore_errors() turns a decoder
        failure into a missing element, so the error can name the image's index.
        """
        num = tf.size(image_bytes)
        limit = self.config.max_images_per_request
        few = tf.debugging.Assert(num <= limit, [
            f"global_descriptor_from_bytes: image_bytes may hold at most {limit} images (the "
            "export setting max_images_per_request); send fewer per request. Received:", num])
        with tf.control_dependencies([few]):
            indices = tf.range(num)
            image_bytes = tf.identity(image_bytes)
        names = tf.strings.join(["global_descriptor_from_bytes: image_bytes[",
                                 tf.strings.as_string(indices), "]"])
        prepared, formats = tf.map_fn(
            lambda args: self._checked_encoded(*args), (image_bytes, names),
            parallel_iterations=1, fn_output_signature=(tf.string, tf.string))

        is_jpeg = tf.equal(formats, encoded_image.FORMAT_NAMES[encoded_image.JPEG])
        max_pixels = self.config.max_decoded_pixels

        def decode(index, data, jpeg):
            # A JPEG's size as libjpeg reads it (one reading with the decoder); over the cap
            # it is not decoded and the flag says so. A header libjpeg cannot read fails
            # here, which ignore_errors() reports as "could not be decoded".
            height, width = tf.cond(
                jpeg, lambda: encoded_image.jpeg_size_as_decoded(data),
                lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64)))
            over = height * width > max_pixels
            image = tf.cond(over, lambda: tf.zeros([1, 1, 3], tf.uint8),
                            lambda: tf.io.decode_image(data, channels=3,
                                                       expand_animations=False))
            return index, tf.ensure_shape(image, [None, None, 3]), tf.stack([height, width])

        # No prefetch (one decoded image at a time) and no per-call graph rewrites.
        options = tf.data.Options()
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
        options.experimental_optimization.apply_default_optimizations = False
        images = iter(tf.data.Dataset.from_tensor_slices((indices, prepared, is_jpeg))
                      .map(decode).ignore_errors().with_options(options))
        out = tf.TensorArray(tf.float32, size=num,
                             element_shape=tf.TensorShape([self.descriptor_dim]))

        def body(k, out):
            element = images.get_next_as_optional()
            got = tf.cond(element.has_value(), lambda: element.get_value()[0],
                          lambda: tf.constant(-1))
            decoded = tf.debugging.Assert(tf.equal(got, k), [tf.strings.join([
                names[k], " could not be decoded as ", formats[k], " (a damaged or truncated "
                "file)."])])
            with tf.control_dependencies([decoded]):
                _, image, size = element.get_value()
            height, width = size[0], size[1]
            within = tf.debugging.Assert(height * width <= max_pixels, [tf.strings.join([
                names[k], " is a ", tf.strings.as_string(width), " x ",
                tf.strings.as_string(height), " JPEG image (", tf.strings.as_string(
                    height * width), " pixels, as libjpeg reads its header), over the export "
                f"setting max_decoded_pixels={max_pixels}; downsize it before sending."])])
            with tf.control_dependencies([within]):
                image = tf.identity(image)
            return k + 1, out.write(k, self._global_descriptor(image, names[k]))

        _, out = tf.while_loop(lambda k, _: k < num, body, (tf.constant(0), out),
                               parallel_iterations=1)
        return {"global_descriptors": tf.ensure_shape(out.stack(),
                                                      [None, self.descriptor_dim])}

    def signatures(self) -> dict:
        """name -> tf.function (input signature fixed), for tf.saved_model.save(signatures=).

        The functions are not traced here: tf.saved_model.save traces them in its save
        context (a trace made outside it would be made again).
        """
        return {name: getattr(self, name) for name in SIGNATURE_NAMES}


def build_serving_module(model, config: Optional[ExportConfig] = None,
                         **settings) -> GlamServingModule:
    """The exported functions, usable in-process (module.global_descriptor(image) etc.).

    `config` / `settings`: the export-time settings (ExportConfig, fields replaced by name).
    """
    return GlamServingModule(model, config, **settings)


class _DropRenamedInputNotice(std_logging.Filter):
    """Drops TF's INFO notice listing every captured input renamed inside the while loops.

    The notice names all ~700 captured variable handles (several kB of log per signature);
    the renaming is internal to the SavedModel and changes no signature input.
    """

    def filter(self, record):
        return "with unsupported characters which will be renamed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_signature_renaming():
    notice_filter = _DropRenamedInputNotice()
    loggers = (logging.get_absl_logger(), tf.get_logger())   # TF logs it through absl
    for logger in loggers:
        logger.addFilter(notice_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice_filter)


SAVED_MODEL_MARKER = "saved_model.pb"  # published last: a version without it is unfinished


def remove_unfinished_versions(export_dir) -> list:
    """Deletes what a killed export left under `export_dir`; returns the deleted paths.

    The temporary folders (`.tmp-<version>-...`, never polled: TF Serving loads only
    numeric folders), and, off a local disk, numeric folders without `saved_model.pb`: there
    a version is published by copying its files with `saved_model.pb` last
    (`files.publish_dir`), so such a folder is a copy a kill interrupted. On a local disk a
    version appears by one rename, whole, and every numeric folder is left alone.
    """
    if not files.isdir(export_dir):
        return []
    removed = files.remove_temporaries(export_dir)
    if not files.is_local(export_dir):
        for name in files.listdir(export_dir):
            path = files.join(export_dir, name)
            if name.isdigit() and not files.exists(files.join(path, SAVED_MODEL_MARKER)):
                files.rmtree(path)
                removed.append(path)
    for path in removed:
        logging.warning("Removed %s, left unfinished by an export that was killed.", path)
    return removed


def export_saved_model(model, export_dir, config: Optional[ExportConfig] = None, *,
                       version=None, extra_info=None, **settings) -> str:
    """Saves the serving module as `<export_dir>/<version>/` (TF Serving layout).

    The SavedModel is written to a hidden temporary folder next to it and renamed into
    place, so a TF Serving instance watching export_dir never sees a half-written version.

    Args:
        model: keras.Model, float32 (B, H, W, 3) RGB in [0, 255] -> (B, D) unit rows.
        export_dir: model base path (created if missing).
        version: non-negative integer; None = next after the existing numbered folders.
        extra_info: JSON-able dict stored with the export settings in
            `assets.extra/glam_export.json` (e.g. the ModelConfig, the checkpoint path).
        config / **settings: the export-time settings (glam_tf.config.ExportConfig, fields
            replaced by name), all recorded in glam_export.json. With warmup_requests
            (default) the TF Serving warm-up file is written too (glam_tf.export.warmup).

    Returns:
        The version folder path.
    """
    export_dir = os.fspath(export_dir)
    remove_unfinished_versions(export_dir)
    version = contract.resolve_version(export_dir, version)
    final = files.join(export_dir, str(version))
    module = build_serving_module(model, config, **settings)
    advice = precision_lib.precision_advice(module.config.precision, cpu.cpu_info())
    if advice:
        (logging.warning if advice[0] else logging.info)("%s", advice[1])
    files.makedirs(export_dir)
    tmp = files.join(export_dir, f"{files.TEMPORARY_TAG}{version}-{uuid.uuid4().hex[:8]}")
    try:
        logging.info("Tracing %d signatures and writing the SavedModel to %s",
                     len(SIGNATURE_NAMES), tmp)
        with _quiet_signature_renaming():
            tf.saved_model.save(module, tmp, signatures=module.signatures())
        info = {
            "signatures": list(SIGNATURE_NAMES),
            "descriptor_dim": module.descriptor_dim,
            **module.config.info(),
            "tensorflow_version": tf.__version__,
        }
        info.update(extra_info or {})
        files.makedirs(files.join(tmp, "assets.extra"))
        files.write_text_atomic(files.join(tmp, contract.EXPORT_INFO_FILE),
                                json.dumps(info, indent=2))
        if module.config.warmup_requests:
            warmup.write_warmup_requests(tmp, module.config)
        files.publish_dir(tmp, final, last=(SAVED_MODEL_MARKER,))
    finally:
        if files.exists(tmp):
            files.rmtree(tmp)
    logging.info("Exported SavedModel version %s to %s", version, final)
    return final
