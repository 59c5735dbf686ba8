"""Builds a search-index SavedModel: a descriptor export plus a database, image in, ids out.

Example:
  python build_index_main.py --export_dir=exports/glam --descriptors=features/db \
      --index_dir=indexes/glam
writes indexes/glam/<next version>/ and prints its path (docs/serving.md, "Search
endpoint", says how to serve and query it). Grow it by new shards or images, and remove
images by id, without describing the old images again:
  python build_index_main.py --export_dir=exports/glam --index_dir=indexes/glam \
      --base_version=1 --descriptors=features/new --remove_ids=gone.txt
The index settings are IndexConfig's (glam_tf.config), flags defined from its fields; with
--train_dir, the descriptor model's settings are ExportConfig's (as export_main's flags).
"""

from absl import app, flags, logging

from glam_tf import files, refusal
from glam_tf.config import ExportConfig, IndexConfig, SettingError, contract, settings


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this program's flags in flag_values."""
    flags.DEFINE_string("index_dir", None, "Index base path; the SavedModel goes to "
                        "<index_dir>/<version>/.", flag_values=flag_values)
    flags.DEFINE_string("export_dir", None, "Descriptor export (a SavedModel folder or its "
                        "base path: the newest version) held by the index.",
                        flag_values=flag_values)
    flags.DEFINE_string("train_dir", None, "Training directory instead of --export_dir (its "
                        "latest checkpoint, default export settings).", flag_values=flag_values)
    flags.DEFINE_list("descriptors", [], "Descriptor shard folders (as eval_main's extract "
                      "stage and the Beam extraction write them) added to the index.",
                      flag_values=flag_values)
    flags.DEFINE_string("images", None, "Text file of image paths (one per line) described "
                        "with the export and added; the paths are the ids.",
                        flag_values=flag_values)
    flags.DEFINE_integer("base_version", None, "Existing version of --index_dir to start "
                         "from (its stored descriptors are reused).", flag_values=flag_values)
    flags.DEFINE_string("remove_ids", None, "Text file of ids (one per line) removed from "
                        "--base_version.", flag_values=flag_values)
    flags.DEFINE_integer("version", None, "Version folder number; default: one more than the "
                         "largest existing.", flag_values=flag_values)
    settings.define_flags(IndexConfig, flag_values)
    settings.define_flags(ExportConfig, flag_values)   # with --train_dir only


def parse_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """Checks every flag (no TensorFlow work yet); returns the build's arguments.

    Raises:
        SettingError naming the flag, the rule and the value received.
        glam_tf.refusal.Refused: --index_dir cannot be written.
    """
    fv = flag_values
    if not fv.index_dir:
        raise SettingError("--index_dir is required.")
    if bool(fv.export_dir) == bool(fv.train_dir):
        raise SettingError("give exactly one of --export_dir (a descriptor export) and "
                           f"--train_dir; got --export_dir={fv.export_dir!r}, "
                           f"--train_dir={fv.train_dir!r}")
    for name in ("index_dir", "export_dir", "train_dir", "images", "remove_ids"):
        if fv[name].value:
            settings.reachable(name, fv[name].value)
    if fv.export_dir:
        try:
            contract.resolve_saved_model_dir(fv.export_dir)
        except FileNotFoundError as e:
            raise SettingError(f"--export_dir: {e}") from None
        changed = sorted(name for name, _, _ in settings.flag_fields(ExportConfig)
                         if fv[name].present)
        if changed:
            raise SettingError(f"--{changed[0]} sets the descriptor model built from "
                               "--train_dir; with --export_dir the export's own settings "
                               "hold (export again to change them)")
    else:
        problem = contract.check_model_source(train_dir=fv.train_dir)
        if problem:
            raise SettingError(problem)
    for folder in fv.descriptors:
        if not files.isfile(files.join(folder, "manifest.json")):
            raise SettingError(f"--descriptors: {folder!r} holds no extracted descriptors "
                               "(no manifest.json); run eval_main's extract stage first")
    for name in ("images", "remove_ids"):
        if fv[name].value and not files.isfile(fv[name].value):
            raise SettingError(f"--{name}={fv[name].value!r} is not a file.")
    if fv.remove_ids and fv.base_version is None:
        raise SettingError("--remove_ids needs --base_version (the version to remove from)")
    if fv.base_version is not None:
        base = files.join(fv.index_dir, str(fv.base_version))
        if not files.isfile(files.join(base, "saved_model.pb")):
            raise SettingError(f"--base_version={fv.base_version}: {base} is not an index "
                               "version (no saved_model.pb)")
    elif not fv.descriptors and not fv.images:
        raise SettingError("nothing to index: give --descriptors, --images or --base_version")
    if files.exists(fv.index_dir) and not files.isdir(fv.index_dir):
        raise SettingError(f"--index_dir={fv.index_dir!r} exists and is not a directory.")
    config = settings.from_flags(IndexConfig, fv)
    config.validate()
    export_config = settings.from_flags(ExportConfig, fv)
    export_config.validate()
    files.ensure_writable_dir(fv.index_dir, "--index_dir")
    try:
        version = contract.resolve_version(fv.index_dir, fv.version)
    except (ValueError, FileExistsError) as e:
        raise SettingError(f"--version: {e}") from None
    from glam_tf import search_index as index  # noqa: PLC0415 (TensorFlow after the checks)

    return dict(index_dir=fv.index_dir, config=config, export_dir=fv.export_dir,
                train_dir=fv.train_dir, export_config=export_config,
                descriptors=list(fv.descriptors),
                images=index.read_id_list(fv.images) if fv.images else [],
                base_version=fv.base_version,
                remove_ids=index.read_id_list(fv.remove_ids) if fv.remove_ids else [],
                version=version)


def run_build(flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """Validates the flags, builds the index version, returns its folder."""
    kwargs = parse_flags(flag_values)
    from glam_tf import search_index as index  # noqa: PLC0415

    export_dir, train_dir = kwargs.pop("export_dir"), kwargs.pop("train_dir")
    export_config = kwargs.pop("export_config")
    if export_dir:
        model, info = index.load_export(export_dir)
    else:
        model, info = index.descriptor_model_from_training(train_dir, export_config)
    path = index.build_index(kwargs.pop("index_dir"), kwargs.pop("config"), model, info,
                             **kwargs)
    logging.info("Index written to %s", path)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    try:
        with refusal.refusals("build_index_main", verbose=flags.FLAGS.verbosity >= 1):
            print(run_build())
    except (SettingError, FileNotFoundError, ValueError) as e:  # bad flag or input data
        settings.exit_with_usage_error("build_index_main", e)


if __name__ == "__main__":
    define_flags()
    refusal.run(main, "build_index_main")
