"""Trains a GLAM descriptor model: flags -> TrainConfig -> validate -> strategy -> train().

    python train_main.py --flagfile=configs/glam_r101_gldv2clean.flags   # the paper
    python train_main.py --flagfile=configs/demo.flags                   # 15-min CPU demo

Rerunning the same command resumes from the newest checkpoint in <train_dir>/checkpoints.
SIGTERM checkpoints and exits cleanly. Multi-worker: set TF_CONFIG on every worker.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from glam_tf.data.pipeline import TrainInputConfig
from glam_tf.model import BACKBONES, VARIANTS, ModelConfig
from glam_tf.train.config import (
    DATA_SOURCES,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    SyntheticDataConfig,
    TrainConfig,
)

_D = TrainConfig(train_dir="unused")
_M = ModelConfig()
_I = TrainInputConfig(file_pattern="")
_S = SyntheticDataConfig(root="")

# Output and run.
flags.DEFINE_string("train_dir", None, "Output folder: checkpoints/, tensorboard/, "
                    "model_config.json, export/. Rerunning with the same folder resumes.")
flags.DEFINE_integer("seed", _D.seed, "Seed of model initialisation and the random data.")
# Model (glam_tf.model.ModelConfig).
flags.DEFINE_enum("backbone", _M.backbone, BACKBONES, "keras.applications ResNet backbone.")
flags.DEFINE_string("weights", _M.weights, "Backbone init: 'imagenet', 'none' (random) or "
                    "the path of a Keras .h5 weights file (no top).")
flags.DEFINE_enum("variant", _M.variant, VARIANTS, "GLAM variant (paper Table 5 rows); "
                  "'global+local' is GLAM, 'baseline' has no attention module.")
flags.DEFINE_integer("reduced_channels", _M.reduced_channels,
                     "c', channels of the spatial attention branches.")
flags.DEFINE_integer("kernel_size", _M.kernel_size, "k of the 1-D channel-attention convs.")
flags.DEFINE_list("dilations", [str(d) for d in _M.dilations],
                  "Dilations of the local spatial attention 3x3 convs.")
flags.DEFINE_float("gem_p", _M.gem_p, "Initial (learnable) GeM exponent.")
flags.DEFINE_float("gem_eps", _M.gem_eps, "GeM clamp.")
flags.DEFINE_integer("embedding_dim", _M.embedding_dim, "Descriptor dimension D.")
flags.DEFINE_float("dropout", _M.dropout, "Dropout rate before the embedding layer.")
flags.DEFINE_bool("zero_init_attention", _M.zero_init_attention,
                  "Start the output convs of local and global spatial attention at zero "
                  "(eqs. 2 and 6 start as identity); for training from random init.")
flags.DEFINE_bool("zero_init_residual", _M.zero_init_residual,
                  "Start every bottleneck block of the backbone as its shortcut (last "
                  "BatchNorm gamma 0); with --weights=none only.")
# Data.
flags.DEFINE_enum("data_source", _D.data_source, DATA_SOURCES,
                  "tfrecord: --train_file_pattern; synthetic: generate (if absent) and "
                  "convert the synthetic landmarks at --synthetic_root; random: file-less "
                  "random tensors (tests, benchmarks).")
flags.DEFINE_string("train_file_pattern", "", "Glob of the training TFRecords "
                    "(glam_tf.data.gldv2 converter output, DELG keys).")
flags.DEFINE_integer("global_batch_size", _I.global_batch_size,
                     "Images per step over all replicas and workers.")
flags.DEFINE_float("size_scale", _I.size_scale, "Scales the aspect-ratio bucket sizes "
                   "(1.0: 352..512 px; 0.25: ~128 px).")
flags.DEFINE_list("aspect_edges", [str(e) for e in _I.aspect_edges],
                  "Increasing h/w edges of the aspect-ratio groups.")
flags.DEFINE_list("bucket_sizes", [f"{w}x{h}" for w, h in _I.bucket_sizes],
                  "WIDTHxHEIGHT of each aspect group (len(aspect_edges) + 1 entries).")
flags.DEFINE_float("crop_scale", _I.crop_scale, "Random zoom 1 +- crop_scale.")
flags.DEFINE_float("brightness", _I.brightness, "Random brightness +- this (0..1 units).")
flags.DEFINE_integer("shuffle_buffer", _I.shuffle_buffer, "Records in the shuffle buffer.")
flags.DEFINE_bool("deterministic_data", _I.deterministic,
                  "Keep decoded records in stream order (reproducible, slower).")
flags.DEFINE_bool("skip_damaged_records", _I.skip_damaged_records,
                  "Train on the valid records of damaged TFRecord shards (bad framing or "
                  "data CRCs), leaving out and counting the damaged spans (clean copies in "
                  "<train_dir>/data_check/); default: refuse to start, listing every "
                  "damaged shard, offset and problem.")
flags.DEFINE_integer("num_classes", _D.num_classes,
                     "ArcFace classes; 0 reads them from the data.")
flags.DEFINE_list("random_image_size", [str(v) for v in _D.random_image_size],
                  "HEIGHT,WIDTH of the --data_source=random images.")
flags.DEFINE_string("synthetic_root", "", "Folder of the synthetic landmark set "
                    "(--data_source=synthetic); generated there when absent.")
flags.DEFINE_integer("synthetic_num_train_landmarks", _S.num_train_landmarks,
                     "Synthetic training classes.")
flags.DEFINE_integer("synthetic_images_per_landmark", _S.images_per_landmark,
                     "Synthetic training images per class.")
flags.DEFINE_integer("synthetic_num_test_landmarks", _S.num_test_landmarks,
                     "Synthetic test landmarks (queries + database).")
flags.DEFINE_integer("synthetic_queries_per_landmark", _S.queries_per_landmark,
                     "Synthetic query photos per test landmark.")
flags.DEFINE_integer("synthetic_num_distractor_landmarks", _S.num_distractor_landmarks,
                     "Synthetic landmarks only in the test database (distractors).")
flags.DEFINE_integer("synthetic_image_size", _S.image_size,
                     "Longer side of the synthetic images, pixels.")
flags.DEFINE_float("synthetic_palette_variation", _S.palette_variation,
                   "How far each synthetic photo's building colours move from its own "
                   "palette towards a random one, in [0, 1] (1: colour is no cue).")
flags.DEFINE_integer("synthetic_seed", _S.seed, "Seed of the synthetic generator.")
# Optimisation.
flags.DEFINE_enum("optimizer", _D.optimizer, OPTIMIZERS,
                  "sgd (the paper) or adamw (from-scratch demo).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.")
flags.DEFINE_float("end_learning_rate", _D.end_learning_rate,
                   "Learning rate at the last step (per-step cosine decay).")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warmup steps (0: none).")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "Decoupled weight decay.")
flags.DEFINE_integer("train_steps", _D.train_steps,
                     "Optimizer steps of the run; 0 derives them from --epochs.")
flags.DEFINE_float("epochs", _D.epochs, "Passes over the training images "
                   "(when --train_steps is 0).")
flags.DEFINE_float("arcface_margin", _D.arcface_margin, "ArcFace margin m (radians).")
flags.DEFINE_float("arcface_scale", _D.arcface_scale, "ArcFace scale s.")
flags.DEFINE_bool("sync_batchnorm", _D.sync_batchnorm,
                  "Batch-norm statistics over the global batch (all replicas).")
flags.DEFINE_float("batchnorm_momentum", _D.batchnorm_momentum,
                   "Moving-average momentum of every batch-norm layer; unset keeps "
                   "Keras' 0.99. Short runs from random init want ~0.9.")
flags.DEFINE_enum("precision", _D.precision, PRECISIONS, "Keras dtype policy for training "
                  "(export and evaluation always run float32).")
# Distribution.
flags.DEFINE_enum("strategy", _D.strategy, STRATEGIES,
                  "auto: multi_worker when TF_CONFIG lists several workers, mirrored over "
                  "several local GPUs, else default (one device).")
flags.DEFINE_float("collective_timeout_s", _D.collective_timeout_s,
                   "Multi-worker collective timeout: a dead peer becomes an error.")
flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into this many logical devices "
                     "(with --strategy=mirrored: multi-replica runs on one CPU); 0: no split.")
# Checkpoints and logs.
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                     "Checkpoint every this many steps (also at the end and on SIGTERM).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints kept.")
flags.DEFINE_integer("log_every", _D.log_every, "Progress line every this many steps.")
flags.DEFINE_integer("summary_every", _D.summary_every,
                     "TensorBoard scalars every this many steps.")
# Export and evaluation.
flags.DEFINE_bool("export", _D.export, "Export the SavedModel to <train_dir>/export.")
flags.DEFINE_list("export_scales", [str(s) for s in _D.export_scales],
                  "Scales of the exported multi-scale descriptor.")
flags.DEFINE_integer("export_max_image_size", _D.export_max_image_size,
                     "Longer-side limit of the exported global_descriptor signature.")
flags.DEFINE_integer("export_max_batch_pixels", _D.export_max_batch_pixels,
                     "Largest exported batched_global_descriptors request (images x pixels "
                     "at the largest scale).")
flags.DEFINE_integer("export_max_decoded_pixels", _D.export_max_decoded_pixels,
                     "Largest image (from its header) the exported "
                     "global_descriptor_from_bytes decodes.")
flags.DEFINE_integer("export_max_image_bytes", _D.export_max_image_bytes,
                     "Largest encoded image (bytes) the exported global_descriptor_from_bytes "
                     "accepts.")
flags.DEFINE_string("eval_dataset", "", "Evaluate at the end on this set (roxford5k, "
                    "rparis6k, synth, ...); empty: no evaluation.")
flags.DEFINE_string("eval_root", "", "Folder holding the evaluation set.")
flags.DEFINE_integer("eval_max_image_size", _D.eval_max_image_size,
                     "Longer side of evaluation images.")
flags.DEFINE_list("eval_scales", [str(s) for s in _D.eval_scales],
                  "Scales of the evaluation descriptor.")
flags.DEFINE_bool("eval_untrained", _D.eval_untrained,
                  "Also evaluate the untrained model at step 0 (same evaluation path).")
flags.DEFINE_integer("inject_nan_at_step", _D.inject_nan_at_step,
                     "Testing hook: make the loss of this step NaN (-1: off).")

FLAGS = flags.FLAGS


def _numbers(flag: str, values, kind):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} must be a comma-separated list of {kind.__name__}s; "
                             f"received --{flag}={','.join(values)}.") from None


def _bucket_sizes(values) -> tuple:
    sizes = []
    for v in values:
        try:
            w, h = v.lower().split("x")
            sizes.append((int(w), int(h)))
        except ValueError:
            raise app.UsageError(f"--bucket_sizes entries must be WIDTHxHEIGHT, e.g. 512x352; "
                                 f"received {v!r}.") from None
    return tuple(sizes)


def config_from_flags(f=FLAGS) -> TrainConfig:
    """Builds the TrainConfig the parsed flags describe (no validation, no TF)."""
    if not f.train_dir:
        raise app.UsageError("--train_dir is required (the run's output folder).")
    model = ModelConfig(
        backbone=f.backbone, weights=f.weights, variant=f.variant,
        reduced_channels=f.reduced_channels, kernel_size=f.kernel_size,
        dilations=_numbers("dilations", f.dilations, int), gem_p=f.gem_p,
        gem_eps=f.gem_eps, embedding_dim=f.embedding_dim, dropout=f.dropout,
        zero_init_attention=f.zero_init_attention, zero_init_residual=f.zero_init_residual)
    data = TrainInputConfig(
        file_pattern=f.train_file_pattern, global_batch_size=f.global_batch_size,
        size_scale=f.size_scale, aspect_edges=_numbers("aspect_edges", f.aspect_edges, float),
        bucket_sizes=_bucket_sizes(f.bucket_sizes), crop_scale=f.crop_scale,
        brightness=f.brightness, shuffle_buffer=f.shuffle_buffer, seed=f.seed,
        deterministic=f.deterministic_data, skip_damaged_records=f.skip_damaged_records)
    synthetic = SyntheticDataConfig(
        root=f.synthetic_root, num_train_landmarks=f.synthetic_num_train_landmarks,
        images_per_landmark=f.synthetic_images_per_landmark,
        num_test_landmarks=f.synthetic_num_test_landmarks,
        queries_per_landmark=f.synthetic_queries_per_landmark,
        num_distractor_landmarks=f.synthetic_num_distractor_landmarks,
        image_size=f.synthetic_image_size, palette_variation=f.synthetic_palette_variation,
        seed=f.synthetic_seed) if f.synthetic_root else None
    return TrainConfig(
        train_dir=f.train_dir, model=model, data=data, data_source=f.data_source,
        synthetic=synthetic, num_classes=f.num_classes,
        random_image_size=_numbers("random_image_size", f.random_image_size, int),
        optimizer=f.optimizer, learning_rate=f.learning_rate,
        end_learning_rate=f.end_learning_rate, warmup_steps=f.warmup_steps,
        momentum=f.momentum, weight_decay=f.weight_decay, train_steps=f.train_steps,
        epochs=f.epochs, arcface_margin=f.arcface_margin, arcface_scale=f.arcface_scale,
        sync_batchnorm=f.sync_batchnorm, batchnorm_momentum=f.batchnorm_momentum,
        precision=f.precision, strategy=f.strategy,
        collective_timeout_s=f.collective_timeout_s, checkpoint_every=f.checkpoint_every,
        keep_checkpoints=f.keep_checkpoints, log_every=f.log_every,
        summary_every=f.summary_every, seed=f.seed, export=f.export,
        export_scales=_numbers("export_scales", f.export_scales, float),
        export_max_image_size=f.export_max_image_size,
        export_max_batch_pixels=f.export_max_batch_pixels,
        export_max_decoded_pixels=f.export_max_decoded_pixels,
        export_max_image_bytes=f.export_max_image_bytes, eval_dataset=f.eval_dataset,
        eval_root=f.eval_root, eval_max_image_size=f.eval_max_image_size,
        eval_scales=_numbers("eval_scales", f.eval_scales, float),
        eval_untrained=f.eval_untrained, inject_nan_at_step=f.inject_nan_at_step)


def main(argv, model_fn=None):
    """absl main; `model_fn` replaces build_descriptor_model (tests' small stand-in)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from glam_tf.data.pipeline import DamagedShardsError
    from glam_tf.train import TrainConfigError, make_strategy, split_logical_cpus, train

    config = config_from_flags()
    try:
        config.validate()
    except (TrainConfigError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.logical_cpus:
        split_logical_cpus(FLAGS.logical_cpus)
    strategy = make_strategy(config.strategy, collective_timeout_s=config.collective_timeout_s)
    try:
        result = (train(config, strategy) if model_fn is None
                  else train(config, strategy, model_fn=model_fn))
    except (TrainConfigError, DamagedShardsError) as e:  # found after the strategy is made:
        raise app.UsageError(str(e)) from None  # batch vs replicas, damaged shards
    from glam_tf.train.reporting import format_attention

    print(f"Learned pooling and fusion at step {result.final_step}: "
          f"{format_attention(result.attention)}", flush=True)
    summary = {
        "start_step": result.start_step, "final_step": result.final_step,
        "total_steps": result.total_steps, "stopped_by_signal": result.stopped_by_signal,
        "final_loss": result.losses.get(result.final_step),
        "attention": result.attention, "export_dir": result.export_dir,
        "wall_time_s": round(result.wall_time_s, 1),
    }
    print("TRAIN_RESULT " + json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("train_dir")
    sys.exit(app.run(main))
