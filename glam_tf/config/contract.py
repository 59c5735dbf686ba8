"""The inference contract and the run-directory layout, shared by train, export and eval.

No TensorFlow at import: flag checks and the evaluator's pure parts read these without loading
it; the path and checkpoint checks load it (through glam_tf.files) when they touch a path.
"""

import os
import re
from typing import Optional

from absl import logging

from glam_tf import files


# The paper's multi-scale inference (GLAM_SPEC "Inference"): scales 1/sqrt(2), 1, sqrt(2)
# of an image whose longer side is 1024 px.
DEFAULT_SCALES = (0.70710678, 1.0, 1.41421356)
DEFAULT_MAX_IMAGE_SIZE = 1024
# ResNet conv5 has stride 32: a smaller side leaves no feature-map cell to pool.
MIN_IMAGE_SIZE = 32
# Written into every SavedModel: the export's settings, read back by the evaluator.
EXPORT_INFO_FILE = "assets.extra/glam_export.json"
# Written into every search-index SavedModel (glam_tf.search_index): its settings and size.
INDEX_INFO_FILE = "assets.extra/glam_index.json"
# Written by the GLDv2 converter beside its shards: class and image counts.
CONVERTER_SUMMARY_FILE = "summary.json"
# The test sets the evaluator reads (glam_tf.data.testsets): the revisited protocol's, with
# the synthetic splits in its layout; the original Oxford5k/Paris6k; the 1M distractors.
REVISITED = ("roxford5k", "rparis6k", "synth", "synth_val")
ORIGINAL = ("oxford5k", "paris6k")
DISTRACTORS = "revisitop1m"


def checkpoints_dir(train_dir: str, worker_index: int = 0) -> str:
    """The chief's checkpoints `<train_dir>/checkpoints` (what export and evaluation read);
    another worker's `<train_dir>/worker_checkpoints/worker_<i>`."""
    if worker_index == 0:
        return files.join(train_dir, "checkpoints")
    return files.join(train_dir, "worker_checkpoints", f"worker_{worker_index}")


# Training saves <train_dir>/checkpoints/ckpt-<step>.{index,data-*}; export, evaluation and
# resumption find them by this name.
CHECKPOINT_NAME = "ckpt"
_CHECKPOINT_FILE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.(index|data-\d+-of-\d+)$")


def checkpoint_files(directory: str) -> dict:
    """step -> names of the `ckpt-<step>.index` / `.data-*` files in `directory`."""
    found = {}
    if files.isdir(directory):
        for name in files.listdir(directory):
            match = _CHECKPOINT_FILE.match(name)
            if match:
                found.setdefault(int(match.group(1)), []).append(name)
    return found


def verify_checkpoint(prefix: str) -> Optional[str]:
    """Why the checkpoint `prefix` cannot be restored, or None when it can.

    Reads the index and every tensor back in one RestoreV2 (the iterator's variant state
    included), which checks each tensor's length and CRC32C against the index: a truncated
    or empty data file, a missing or truncated index, or changed bytes all fail here, before
    anything is restored into the live objects.

    Raises:
        tf.errors.PermissionDeniedError: the files cannot be read (not damage: fix access).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        # The reader of the prefix itself: tf.train.load_checkpoint first asks whether the
        # prefix is a folder, which ram:// (listing by name prefix) answers yes.
        dtypes = tf.compat.v1.train.NewCheckpointReader(prefix).get_variable_to_dtype_map()
        names = sorted(dtypes)
        tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=names,
                             shape_and_slices=[""] * len(names),
                             dtypes=[dtypes[n] for n in names])
    except tf.errors.PermissionDeniedError:
        raise
    except (tf.errors.OpError, IndexError, ValueError) as e:
        text = e.message if isinstance(e, tf.errors.OpError) else str(e)
        text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", text)
        return f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else '-'}"
    return None


def latest_checkpoint(train_dir) -> str:
    """Prefix of the newest checkpoint under `<train_dir>/checkpoints/` that restores.

    Lists the `ckpt-<step>` files (the `checkpoint` state file may be missing or stale) and
    returns the newest that `verify_checkpoint` reads back whole; a damaged newer one is
    logged and skipped (left in place: the next training run moves it aside).
    """
    ckpt_dir = checkpoints_dir(os.fspath(train_dir))
    if not files.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} does not exist: training writes its "
                                "tf.train.Checkpoint files there.")
    damaged = []
    for step in sorted(checkpoint_files(ckpt_dir), reverse=True):
        prefix = files.join(ckpt_dir, f"{CHECKPOINT_NAME}-{step}")
        why = verify_checkpoint(prefix)
        if why is None:
            return prefix
        damaged.append(f"{CHECKPOINT_NAME}-{step} ({why})")
        logging.warning("Checkpoint %s is damaged (%s): using an older one.", prefix, why)
    if damaged:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} restores: damaged "
                                f"{', '.join(damaged)}")
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no ckpt-<step>.index / .data "
                            "files); has training saved one yet?")


def model_config_path(train_dir: str) -> str:
    """`<train_dir>/model_config.json`: the ModelConfig that export and eval rebuild."""
    return files.join(train_dir, "model_config.json")


def train_config_path(train_dir: str) -> str:
    """`<train_dir>/train_config.json`: the whole TrainConfig of the run, for the record."""
    return files.join(train_dir, "train_config.json")


def export_dir(train_dir: str) -> str:
    """`<train_dir>/export`: the run's SavedModel versions (TF Serving base path)."""
    return files.join(train_dir, "export")


def tensorboard_dir(train_dir: str) -> str:
    """`<train_dir>/tensorboard`: the run's scalars."""
    return files.join(train_dir, "tensorboard")


def eval_dir(train_dir: str, step: int) -> str:
    """`<train_dir>/eval/step_<step>`: features and results of the evaluation at `step`."""
    return files.join(train_dir, "eval", f"step_{step}")


def data_check_dir(train_dir: str) -> str:
    """`<train_dir>/data_check`: clean copies of damaged shards and what was verified."""
    return files.join(train_dir, "data_check")


def resolve_saved_model_dir(path) -> str:
    """The SavedModel folder: `path` itself if it holds saved_model.pb, else its newest
    numbered version folder (as TF Serving picks). FileNotFoundError explains otherwise."""
    path = os.fspath(path)
    if not files.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if files.isfile(files.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(n) for n in files.listdir(path)
                       if n.isdigit() and files.isfile(files.join(path, n, "saved_model.pb"))))
    if not versions:
        raise FileNotFoundError(f"{path!r} is not a SavedModel: no saved_model.pb in it nor in "
                                "a numbered version folder (<model>/<version>/saved_model.pb)")
    return files.join(path, str(versions[-1]))


def check_model_source(model=None, train_dir=None):
    """Exactly one of a SavedModel path and a training directory, each with its files.

    Returns an error message (naming `model` or `train_dir`) or None when fine.
    """
    if bool(model) == bool(train_dir):
        return ("give exactly one of --model (a SavedModel directory) and --train_dir (a "
                "training directory with model_config.json and checkpoints/); got "
                f"--model={model!r}, --train_dir={train_dir!r}")
    if model:
        try:
            resolve_saved_model_dir(model)
        except FileNotFoundError as e:
            return f"--model: {e}"
        return None
    missing = [p for p in (model_config_path(train_dir), checkpoints_dir(train_dir))
               if not files.exists(p)]
    if missing:
        return f"--train_dir: {train_dir!r} lacks {', '.join(missing)}"
    return None


def next_version(export_dir: str) -> int:
    """1 + the largest integer-named subfolder of export_dir (1 when there is none)."""
    if not files.isdir(export_dir):
        return 1
    versions = [int(n) for n in files.listdir(export_dir)
                if n.isdigit() and files.isdir(files.join(export_dir, n))]
    return max(versions, default=0) + 1


def resolve_version(export_dir, version=None) -> int:
    """The version folder number to write: `version`, or the next free one when None.

    Raises:
        ValueError: version is not a non-negative integer.
        FileExistsError: `<export_dir>/<version>` already exists.
    """
    export_dir = os.fspath(export_dir)
    if version is None:
        version = next_version(export_dir)
    elif not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be a non-negative integer (the TF Serving version "
                         f"folder name); received version={version!r}.")
    final = files.join(export_dir, str(int(version)))
    if files.exists(final):
        raise FileExistsError(f"{final} already exists; pass another version, or leave "
                              "version unset to take the next free number.")
    return int(version)
