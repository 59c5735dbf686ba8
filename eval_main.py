"""Evaluates a GLAM model on ROxf/RPar (+1M), Oxf5k/Par6k or the synthetic test split.

  python eval_main.py --flagfile=configs/eval_roxford5k.flags --model=/models/glam
  python eval_main.py --flagfile=configs/eval_roxford5k.flags --train_dir=/runs/glam
  python eval_main.py --flagfile=configs/eval_synth.flags --train_dir=runs/demo --scales=1 \
      --visualize_attention      # + attention maps of the --visualize queries (checkpoint)

Over several hosts (the 1M distractors): run with --num_shards=N --shard_index=i on each
(--stage=extract), then once with --stage=evaluate, which checks every shard is there.
Prints the paper-layout table; writes <output_dir>/results-<dataset>.json.
The flags are EvalConfig's settings (glam_tf.config), defined from its fields.
"""

import sys

from absl import app, flags, logging

from glam_tf.config import EvalConfig, SettingError, settings

settings.define_flags(EvalConfig)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = settings.from_flags(EvalConfig, FLAGS)
        # scoring extracted features needs no model
        config.validate(check_model=config.stage != "evaluate" or bool(
            config.model or config.train_dir))
    except SettingError as e:
        settings.exit_with_usage_error("eval_main", e)
    from glam_tf.data.testsets import MissingDataError, UnsafePickleError  # noqa: PLC0415
    from glam_tf.eval import evaluator  # noqa: PLC0415

    try:
        results = evaluator.run_evaluation(config)
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
