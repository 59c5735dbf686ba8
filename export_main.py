"""Exports a TF Serving SavedModel (DELG-compatible signatures) from a training directory.

Example:
  python export_main.py --train_dir=runs/glam_r101 --export_dir=exports/glam \
      --scales=0.70710678,1.0,1.41421356 --max_image_size=1024
writes exports/glam/<next version>/ (README.md "Export and serving" says how to serve it).

The flags are defined by define_flags() when run as a program (not at import), so tests can
parse them into their own FlagValues and other *_main modules with a --train_dir flag can be
imported in the same process.
"""

import os

from absl import app, flags, logging

from glam_tf.export import export_from_checkpoint, serving


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this program's flags in flag_values."""
    flags.DEFINE_string("train_dir", None,
                        "Training directory holding model_config.json and checkpoints/.",
                        flag_values=flag_values)
    flags.DEFINE_string("export_dir", None,
                        "Model base path; the SavedModel goes to <export_dir>/<version>/.",
                        flag_values=flag_values)
    flags.DEFINE_integer("version", None,
                         "Version folder number; default: one more than the largest existing.",
                         flag_values=flag_values)
    flags.DEFINE_list("scales", [str(s) for s in serving.DEFAULT_SCALES],
                      "Comma-separated image scales of the global_descriptor / batched / "
                      "from_bytes signatures (serving_default takes its scales per request).",
                      flag_values=flag_values)
    flags.DEFINE_integer("max_image_size", serving.DEFAULT_MAX_IMAGE_SIZE,
                         "Longer side (px) the global_descriptor signatures resize images to.",
                         flag_values=flag_values)
    flags.DEFINE_integer("max_batch_pixels", serving.DEFAULT_MAX_BATCH_PIXELS,
                         "Largest batched_global_descriptors request: images x pixels per "
                         "image at the largest scale.", flag_values=flag_values)
    flags.DEFINE_integer("max_decoded_pixels", serving.DEFAULT_MAX_DECODED_PIXELS,
                         "Largest image (width x height, read from its header before "
                         "decoding) global_descriptor_from_bytes accepts.",
                         flag_values=flag_values)
    flags.DEFINE_integer("max_image_bytes", serving.DEFAULT_MAX_IMAGE_BYTES,
                         "Largest encoded image (bytes) global_descriptor_from_bytes accepts.",
                         flag_values=flag_values)


def parse_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """Checks every flag (no TF work yet); returns export_from_checkpoint's arguments.

    Raises:
        app.UsageError naming the flag, the rule and the value received.
    """
    fv = flag_values
    for name in ("train_dir", "export_dir"):
        if not fv[name].value:
            raise app.UsageError(f"--{name} is required.")
    if not os.path.isdir(fv.train_dir):
        raise app.UsageError(f"--train_dir={fv.train_dir!r} is not a directory.")
    if os.path.exists(fv.export_dir) and not os.path.isdir(fv.export_dir):
        raise app.UsageError(f"--export_dir={fv.export_dir!r} exists and is not a directory.")
    try:
        scales = tuple(float(s) for s in fv.scales)
    except ValueError:
        raise app.UsageError(f"--scales must be comma-separated numbers, e.g. "
                             f"0.70710678,1.0,1.41421356; received {fv.scales!r}.") from None
    limits = {name: fv[name].value
              for name in ("max_batch_pixels", "max_decoded_pixels", "max_image_bytes")}
    try:
        scales = serving.validate_export_args(scales=scales, max_image_size=fv.max_image_size,
                                              **limits)
        version = serving.resolve_version(fv.export_dir, fv.version)
    except (ValueError, FileExistsError) as e:
        raise app.UsageError(f"bad flag value (--scales / --max_image_size / --max_batch_pixels"
                             f" / --max_decoded_pixels / --max_image_bytes / --version): "
                             f"{e}") from None
    return dict(train_dir=fv.train_dir, export_dir=fv.export_dir, version=version,
                scales=scales, max_image_size=fv.max_image_size, **limits)


def run_export(flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """Validates the flags, exports, returns the version folder path."""
    kwargs = parse_flags(flag_values)
    path = export_from_checkpoint(**kwargs)
    logging.info("SavedModel written to %s", path)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    print(run_export())


if __name__ == "__main__":
    define_flags()
    app.run(main)
