"""Exports a TF Serving SavedModel (DELG-compatible signatures) from a training directory.

Example:
  python export_main.py --train_dir=runs/glam_r101 --export_dir=exports/glam \
      --scales=0.70710678,1.0,1.41421356 --max_image_size=1024
writes exports/glam/<next version>/ (docs/serving.md says how to serve it).
The export settings are ExportConfig's (glam_tf.config), flags defined from its fields.

The flags are defined by define_flags() when run as a program (not at import), so tests can
parse them into their own FlagValues and other *_main modules with a --train_dir flag can be
imported in the same process.
"""

from absl import app, flags, logging

from glam_tf import files, refusal
from glam_tf.config import ExportConfig, SettingError, contract, settings

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
    settings.define_flags(ExportConfig, flag_values)

def parse_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """Checks every flag (no TF work yet); returns export_from_checkpoint's arguments.

    Raises:
        SettingError naming the flag, the rule and the value received.
        glam_tf.refusal.Refused: --export_dir cannot be written.
    """
    fv = flag_values
    for name in ("train_dir", "export_dir"):
        if not fv[name].value:
            raise SettingError(f"--{name} is required.")
        settings.reachable(name, fv[name].value)
    if not files.isdir(fv.train_dir):
        raise SettingError(f"--train_dir={fv.train_dir!r} is not a directory.")
    if files.exists(fv.export_dir) and not files.isdir(fv.export_dir):
        raise SettingError(f"--export_dir={fv.export_dir!r} exists and is not a directory.")
    config = settings.from_flags(ExportConfig, fv)
    config.validate()
    files.ensure_writable_dir(fv.export_dir, "--export_dir")  # refuses before the model is built
    try:
        version = contract.resolve_version(fv.export_dir, fv.version)
    except (ValueError, FileExistsError) as e:
        raise SettingError(f"--version: {e}") from None
    return dict(train_dir=fv.train_dir, export_dir=fv.export_dir, version=version,
                config=config)

def run_export(flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """Validates the flags, exports, returns the version folder path."""
    kwargs = parse_flags(flag_values)
    from glam_tf.export import export_from_checkpoint  # noqa: PLC0415 (after the checks)

    path = export_from_checkpoint(**kwargs)
    logging.info("SavedModel written to %s", path)
    return path

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    try:
        with refusal.refusals("export_main", verbose=flags.FLAGS.verbosity >= 1):
            print(run_export())
    except (SettingError, FileNotFoundError, ValueError) as e:  # bad flag, or a train_dir
        settings.exit_with_usage_error("export_main", e)  # without its files

if __name__ == "__main__":
    define_flags()
    refusal.run(main, "export_main")
