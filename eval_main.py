"""Evaluates a GLAM model on ROxf/RPar (+1M), Oxf5k/Par6k or the synthetic test split.

  python eval_main.py --flagfile=configs/eval_roxford5k.flags --model=/models/glam
  python eval_main.py --flagfile=configs/eval_roxford5k.flags --train_dir=/runs/glam
  python eval_main.py --flagfile=configs/eval_synth.flags --train_dir=runs/demo --scales=1 \
      --visualize_attention      # + attention maps of the --visualize queries (checkpoint)

Extraction is one Apache Beam pipeline (glam_tf.eval.extract_beam): on this machine's
DirectRunner by default: one in-memory worker (this process and its model) below 1000 images
to describe, else 2 worker processes (--direct_num_workers=N chooses); any flag
that is not EvalConfig's goes to Beam, so the 1M distractors run on a cluster with e.g.
  --stage=extract --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
then --stage=evaluate. (--num_shards=N --shard_index=i on N hosts, each with
--stage=extract, still works without a cluster.)
Prints the paper-layout table; writes <output_dir>/results-<dataset>.json.
The flags are EvalConfig's settings (glam_tf.config), defined from its fields.
"""

import sys

from absl import flags, logging

from glam_tf import beam_options, refusal
from glam_tf.config import EvalConfig, SettingError, settings

settings.define_flags(EvalConfig)
FLAGS = flags.FLAGS


def main(argv):
    try:
        config = settings.from_flags(EvalConfig, FLAGS)
        # scoring extracted features needs no model
        config.validate(check_model=config.stage != "evaluate" or bool(
            config.model or config.train_dir))
        beam_options.check_args(argv[1:])
    except (SettingError, ValueError) as e:
        settings.exit_with_usage_error("eval_main", e)
    from glam_tf.data.testsets import MissingDataError  # noqa: PLC0415
    from glam_tf.eval import evaluator  # noqa: PLC0415
    from glam_tf.safe_pickle import UnsafePickleError  # noqa: PLC0415

    try:
        with refusal.refusals("eval_main", verbose=FLAGS.verbosity >= 1):
            results = evaluator.run_evaluation(config, beam_args=argv[1:])
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
    refusal.run(main, "eval_main",
                flags_parser=beam_options.parse_flags_keep_beam_args)
