"""Evaluates a GLAM model on ROxf/RPar (+1M), Oxf5k/Par6k or the synthetic test split.

  python eval_main.py --flagfile=configs/eval_roxford5k.flags --model=/models/glam
  python eval_main.py --flagfile=configs/eval_roxford5k.flags --train_dir=/runs/glam

Over several hosts (the 1M distractors): run with --num_shards=N --shard_index=i on each
(--stage=extract), then once with --stage=evaluate, which checks every shard is there.
Prints the paper-layout table; writes <output_dir>/results-<dataset>.json.
"""

import sys

from absl import app, flags, logging

from glam_tf.data.testsets import MissingDataError, UnsafePickleError
from glam_tf.eval import evaluator, models

FLAGS = flags.FLAGS

flags.DEFINE_enum("dataset", None, list(evaluator.DATASETS), "Test set.")
flags.DEFINE_string("data_root", None, "Folder holding <dataset>/ (jpg/ + ground truth).")
flags.DEFINE_string("output_dir", None, "Where features, results JSON and pictures go.")
flags.DEFINE_string("model", "", "SavedModel directory (numbered version folder or parent).")
flags.DEFINE_string("train_dir", "", "Training directory (model_config.json + checkpoints/), "
                    "instead of --model.")
flags.DEFINE_bool("distractors", False, "Add the revisitop1m distractors (roxford5k/rparis6k).")
flags.DEFINE_string("distractors_root", "", "Folder holding revisitop1m/ (default: data_root).")
flags.DEFINE_integer("max_image_size", 1024, "Longer side of full images after resizing.")
flags.DEFINE_list("scales", [],
                  "Multi-scale factors; empty = the model's own (a SavedModel's export-time "
                  "scales, else 0.70710678,1,1.41421356). Other scales than a SavedModel's "
                  "export-time ones go through its serving_default signature, one image per "
                  "call.")
flags.DEFINE_integer("batch_size", 8, "Images per model call (same resized size only). "
                     "Batching pays on accelerators; on a 2-core CPU bench/extract.py measured "
                     "batch 8 at 0.7-1.0x the one-at-a-time speed, so use 1 there.")
flags.DEFINE_integer("shard_size", 1000, "Images per feature shard file.")
flags.DEFINE_integer("num_shards", 1, "Hosts sharing the extraction.")
flags.DEFINE_integer("shard_index", 0, "This host's index in [0, num_shards).")
flags.DEFINE_integer("num_workers", 2, "Image decoding threads.")
flags.DEFINE_enum("stage", "all", list(evaluator.STAGES),
                  "all: extract then evaluate; extract: only this host's shards; evaluate: "
                  "merge (checks completeness), search and score.")
flags.DEFINE_integer("topk", 100, "Neighbours per query stored in the results JSON.")
flags.DEFINE_list("visualize", [], "Query indices or names to draw with their top 10.")
flags.DEFINE_string("approx_index", "", "faiss index_factory string (e.g. HNSW32) to report "
                    "approximate search recall@approx_k against exact search.")
flags.DEFINE_string("approx_params", "", "faiss search parameters, e.g. efSearch=128 or "
                    "nprobe=16.")
flags.DEFINE_integer("approx_k", 100, "k of the approximate-search recall.")
flags.DEFINE_integer("memory_budget_mb", 0, "Search temporaries budget in MiB; 0 = automatic.")
flags.DEFINE_float("log_every_s", 30.0, "Progress logging interval (seconds).")

flags.mark_flags_as_required(["dataset", "data_root", "output_dir"])


def _scales_ok(value):
    if not value:
        return True
    try:
        models.check_scales(value)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def _model_ok(values):
    if values["stage"] == "evaluate" and not (values["model"] or values["train_dir"]):
        return True  # scoring extracted features needs no model
    err = models.check_model_source(values["model"], values["train_dir"])
    if err:
        raise flags.ValidationError(err)
    return True


flags.register_validator("scales", _scales_ok)
flags.register_multi_flags_validator(["model", "train_dir", "stage"], _model_ok)
for _name in ("max_image_size", "batch_size", "shard_size", "num_shards", "num_workers", "topk",
              "approx_k"):
    flags.register_validator(_name, lambda v: v >= 1, message="must be a positive integer")
flags.register_multi_flags_validator(
    ["shard_index", "num_shards"], lambda v: 0 <= v["shard_index"] < v["num_shards"],
    message="--shard_index must be in [0, --num_shards)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    kwargs = {name: FLAGS[name].value for name in (
        "distractors", "distractors_root", "max_image_size", "batch_size", "shard_size",
        "num_shards", "shard_index", "num_workers", "stage", "topk", "approx_index",
        "approx_params", "approx_k",
        "memory_budget_mb", "log_every_s")}
    try:
        results = evaluator.run_evaluation(
            dataset=FLAGS.dataset, data_root=FLAGS.data_root, output_dir=FLAGS.output_dir,
            model=FLAGS.model, train_dir=FLAGS.train_dir,
            scales=tuple(float(s) for s in FLAGS.scales) or None, visualize=tuple(FLAGS.visualize),
            **kwargs)
    except (ValueError, FileNotFoundError, MissingDataError, UnsafePickleError,
            ImportError) as e:
        logging.error("%s", e)
        print(f"eval_main: error: {e}", file=sys.stderr)
        sys.exit(2)
    if results["status"] != "complete":
        missing = results["missing_shards"]
        print(f"eval_main: this host's features extracted; shards still missing (other "
              f"hosts): {missing}" if missing else "eval_main: features extracted")


if __name__ == "__main__":
    app.run(main)
