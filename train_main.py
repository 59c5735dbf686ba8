"""Trains a GLAM descriptor model: flags -> TrainConfig -> validate -> strategy -> train().

    python train_main.py --flagfile=configs/glam_r101_gldv2clean.flags   # the paper
    python train_main.py --flagfile=configs/demo.flags                   # 15-min CPU demo

Rerunning the same command resumes from the newest checkpoint in <train_dir>/checkpoints.
SIGTERM checkpoints and exits cleanly. Multi-worker: set TF_CONFIG on every worker.
The flags are TrainConfig's settings (glam_tf.config), defined from its fields.
"""

from __future__ import annotations

import json
import statistics

from absl import app, flags

from glam_tf import refusal
from glam_tf.config import SettingError, TrainConfig, settings

settings.define_flags(TrainConfig)
flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into this many logical devices "
                     "(with --strategy=mirrored: multi-replica runs on one CPU); 0: no split.")

FLAGS = flags.FLAGS


def config_from_flags(f=FLAGS) -> TrainConfig:
    """The TrainConfig the parsed flags describe (not validated, no TF)."""
    return settings.from_flags(TrainConfig, f)


def main(argv, model_fn=None):
    """absl main; `model_fn` replaces build_descriptor_model (tests' small stand-in)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
        config.validate()
    except SettingError as e:
        settings.exit_with_usage_error("train_main", e)
    from glam_tf.data.pipeline import DamagedShardsError
    from glam_tf.train import make_strategy, split_logical_cpus, train

    if FLAGS.logical_cpus:
        split_logical_cpus(FLAGS.logical_cpus)
    strategy = make_strategy(config.strategy, collective_timeout_s=config.collective_timeout_s)
    try:
        with refusal.refusals("train_main", verbose=FLAGS.verbosity >= 1):
            result = (train(config, strategy) if model_fn is None
                      else train(config, strategy, model_fn=model_fn))
    except (SettingError, DamagedShardsError) as e:  # found after the strategy is made:
        settings.exit_with_usage_error("train_main", e)  # batch vs replicas, damaged shards
    from glam_tf.train.reporting import format_attention

    print(f"Learned pooling and fusion at step {result.final_step}: "
          f"{format_attention(result.attention)}", flush=True)
    # Mean loss over the last tenth of the steps run: one batch's loss is noisy.
    losses = [result.losses[k] for k in sorted(result.losses)]
    tail_loss = statistics.fmean(losses[-max(1, len(losses) // 10):]) if losses else None
    summary = {
        "start_step": result.start_step, "final_step": result.final_step,
        "total_steps": result.total_steps, "stopped_by_signal": result.stopped_by_signal,
        "final_loss": result.losses.get(result.final_step),
        "tail_loss": tail_loss,
        "num_classes": result.num_classes,
        "attention": result.attention, "export_dir": result.export_dir,
        "wall_time_s": round(result.wall_time_s, 1),
    }
    print("TRAIN_RESULT " + json.dumps(summary, sort_keys=True), flush=True)
    if not result.stopped_by_signal:
        from glam_tf.train.what_next import what_next

        closing = what_next(config, export_dir=result.export_dir,
                            outputs=(result.evaluation or {}).get("outputs"))
        if closing:
            print(closing, flush=True)


if __name__ == "__main__":
    refusal.run(main, "train_main")
