"""TrainConfig: everything one training run needs, validated before any heavy work.

The paper's recipe (GLAM_SPEC.md "Training recipe") is the default: SGD lr 1e-3,
momentum 0.9, weight decay 1e-5, global batch 64, ArcFace m 0.3 s 30, cosine decay per
step to 3e-6. Only train_main.py reads flags; it builds a TrainConfig and calls
`glam_tf.train.train(config)`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import numbers
import os
from typing import Optional

from glam_tf.data.pipeline import TrainInputConfig
from glam_tf.model import ModelConfig

DATA_SOURCES = ("tfrecord", "synthetic", "random")
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


class TrainConfigError(ValueError):
    """A TrainConfig field breaks its rule; the message names the flag, rule, value and fix."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(flag: str, rule: str, value, fix: str = ""):
    raise TrainConfigError(f"--{flag} {rule}; received --{flag}={value!r}. {fix}".rstrip())


@dataclasses.dataclass(frozen=True)
class SyntheticDataConfig:
    """Size of the synthetic landmark set the demo generates (glam_tf.data.synthetic).

    Attributes:
        root: folder of the set; generated there when absent, reused when present.
        num_train_landmarks: training classes.
        images_per_landmark: training images per class.
        num_test_landmarks: landmarks of the test split (queries + database), disjoint
            from the training ones.
        queries_per_landmark: query photos per test landmark.
        num_distractor_landmarks: landmarks only in the test database (4 photos each).
        image_size: longer side of the generated images, pixels.
        palette_variation: in [0, 1], how far each photo's building colours move from
            the landmark's own palette to a random one (1: colour says nothing of identity).
        seed: generator seed.
    """

    root: str
    num_train_landmarks: int = 100
    images_per_landmark: int = 15
    num_test_landmarks: int = 10
    queries_per_landmark: int = 5
    num_distractor_landmarks: int = 20
    image_size: int = 224
    palette_variation: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, optimizer, schedule, distribution and outputs.

    Attributes:
        train_dir: output folder: checkpoints/, tensorboard/, model_config.json, export/.
        model: the descriptor model (glam_tf.model.ModelConfig).
        data: the input pipeline (glam_tf.data.pipeline.TrainInputConfig); its
            global_batch_size is the global batch of the run.
        data_source: "tfrecord" (data.file_pattern), "synthetic" (generate the
            synthetic landmarks into `synthetic.root` when absent, convert them to
            TFRecords, train on those) or "random" (random tensors with a class colour
            code: for tests and benchmarks, no files).
        synthetic: sizes of the synthetic set (data_source "synthetic").
        num_classes: ArcFace classes; 0 reads them from the TFRecords (converter
            metadata or a label scan). Required > 0 for data_source "random".
        random_image_size: (height, width) of the "random" stand-in images.
        optimizer: "sgd" (paper) or "adamw".
        learning_rate: peak learning rate (after warmup).
        end_learning_rate: learning rate at the last step (cosine decay alpha =
            end / peak).
        warmup_steps: linear warmup from 0 to learning_rate (0: none, the paper).
        momentum: SGD momentum.
        weight_decay: decoupled weight decay (Keras 3 optimizers: w -= lr * wd * w).
        train_steps: optimizer steps of the whole run (> 0), or 0 to derive them from
            `epochs` and the number of training images.
        epochs: passes over the training images when train_steps is 0.
        arcface_margin, arcface_scale: ArcFace m and s.
        sync_batchnorm: batch statistics over the global batch (all replicas) in every
            BatchNormalization layer of the model.
        batchnorm_momentum: moving-average momentum of every BatchNormalization layer of
            the model, or None to keep theirs (Keras' 0.99). Short runs from random init
            need a lower one (the demo: 0.9): with 0.99 the moving statistics trail the
            fast-changing network by ~100 steps and the evaluated (inference-mode)
            model is worse than the trained one.
        precision: Keras dtype policy during training ("mixed_bfloat16" is ~1.5x faster
            on CPUs with AVX512-BF16; variables stay float32).
        strategy: "auto" (multi-worker when TF_CONFIG lists several workers, else
            mirrored over all local GPUs when there are several, else the default
            strategy), or one of them by name ("mirrored" on a machine without GPUs
            mirrors over all logical CPU devices).
        collective_timeout_s: multi-worker collective timeout (a dead peer -> error).
        checkpoint_every: save every this many steps (and at the end, and on SIGTERM).
        keep_checkpoints: checkpoints kept per worker.
        log_every: progress line every this many steps.
        summary_every: TensorBoard scalars every this many steps.
        seed: seed of model initialisation and of the "random" stand-in data.
        export: export the SavedModel to <train_dir>/export at the end.
        export_scales: scales of the exported multi-scale descriptor.
        export_max_image_size: longer-side limit of the exported `global_descriptor`.
        export_max_batch_pixels, export_max_decoded_pixels, export_max_image_bytes: the
            exported signatures' request limits (glam_tf.export.serving's defaults:
            max_batch_pixels, max_decoded_pixels, max_image_bytes).
        eval_dataset: evaluation set name ("roxford5k", "rparis6k", "synth", ...) or ""
            for none.
        eval_root: folder holding the evaluation set.
        eval_max_image_size: longer side of evaluation images.
        eval_scales: scales of the evaluation descriptor.
        eval_untrained: also evaluate the model before its first step (only when the
            run starts at step 0), to show what training added.
        inject_nan_at_step: testing hook: the loss of this step (1-based) is replaced by
            NaN, to exercise the NaN guard; -1 (default) disables it.
    """

    train_dir: str
    model: ModelConfig = ModelConfig()
    data: TrainInputConfig = TrainInputConfig(file_pattern="")
    data_source: str = "tfrecord"
    synthetic: Optional[SyntheticDataConfig] = None
    num_classes: int = 0
    random_image_size: tuple = (64, 64)
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    end_learning_rate: float = 3e-6
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    train_steps: int = 0
    epochs: float = 0.0
    arcface_margin: float = 0.3
    arcface_scale: float = 30.0
    sync_batchnorm: bool = True
    batchnorm_momentum: Optional[float] = None
    precision: str = "float32"
    strategy: str = "auto"
    collective_timeout_s: float = 300.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 100
    summary_every: int = 100
    seed: int = 0
    export: bool = True
    export_scales: tuple = (0.70710678, 1.0, 1.41421356)
    export_max_image_size: int = 1024
    export_max_batch_pixels: int = 2**25
    export_max_decoded_pixels: int = 2**27
    export_max_image_bytes: int = 64 * 2**20
    eval_dataset: str = ""
    eval_root: str = ""
    eval_max_image_size: int = 1024
    eval_scales: tuple = (0.70710678, 1.0, 1.41421356)
    eval_untrained: bool = False
    inject_nan_at_step: int = -1

    @property
    def global_batch_size(self) -> int:
        return self.data.global_batch_size

    def validate(self) -> None:
        """Raises TrainConfigError (a ValueError) naming the first bad flag; cheap (no TF).

        Checks that need the strategy (batch divisible by replicas) are in
        `validate_for_replicas`; the existence of data files is checked here.
        """
        if not isinstance(self.train_dir, str) or not self.train_dir:
            _fail("train_dir", "must be a non-empty folder path", self.train_dir,
                  "Pass e.g. --train_dir=runs/glam.")
        try:
            self.model.validate()
        except ValueError as e:  # re-raise with the flag name of the field
            raise TrainConfigError(f"model flag: {e}") from e
        if self.data_source not in DATA_SOURCES:
            _fail("data_source", f"must be one of {DATA_SOURCES}", self.data_source)
        b = self.data.global_batch_size
        if not _is_int(b) or b < 1:
            _fail("global_batch_size", "must be a positive integer", b,
                  "The paper uses 64.")
        if not _is_real(self.data.size_scale) or not self.data.size_scale > 0:
            _fail("size_scale", "must be > 0", self.data.size_scale,
                  "1.0 keeps the paper's 352..512-px buckets; 0.25 gives ~128 px.")
        if self.data_source == "tfrecord":
            pattern = self.data.file_pattern
            if not pattern:
                _fail("train_file_pattern", "is required with --data_source=tfrecord",
                      pattern, "Point it at the converter's output, e.g. "
                      "--train_file_pattern=data/gldv2_tfrecord/train-*.")
            if not glob.glob(pattern):
                _fail("train_file_pattern", "matches no file", pattern,
                      "Convert GLDv2 first (python build_gldv2_main.py --gldv2_root=... --output_dir=...) "
                      "or fix the glob.")
        if self.data_source == "synthetic":
            s = self.synthetic
            if s is None or not s.root:
                _fail("synthetic_root", "is required with --data_source=synthetic",
                      None if s is None else s.root, "Pass e.g. --synthetic_root=data/synth.")
            for name in ("num_train_landmarks", "images_per_landmark", "num_test_landmarks",
                         "queries_per_landmark", "num_distractor_landmarks", "image_size"):
                v = getattr(s, name)
                low = 0 if name == "num_distractor_landmarks" else 1
                if not _is_int(v) or v < low:
                    _fail(f"synthetic_{name}", f"must be an integer >= {low}", v)
            if s.image_size < 32:
                _fail("synthetic_image_size", "must be >= 32 (the backbone's minimum)",
                      s.image_size)
            if not _is_real(s.palette_variation) or not 0.0 <= s.palette_variation <= 1.0:
                _fail("synthetic_palette_variation", "must be a number in [0, 1]",
                      s.palette_variation)
            if s.images_per_landmark < 2:
                _fail("synthetic_images_per_landmark", "must be >= 2 (a class needs "
                      "several views)", s.images_per_landmark)
        if not _is_int(self.num_classes) or self.num_classes < 0:
            _fail("num_classes", "must be an integer >= 0 (0: read from the data)",
                  self.num_classes)
        if self.data_source == "random":
            if self.num_classes < 1:
                _fail("num_classes", "must be > 0 with --data_source=random",
                      self.num_classes)
            size = self.random_image_size
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(_is_int(v) and v >= 32 for v in size)):
                _fail("random_image_size", "must be two integers >= 32 (height, width)",
                      size)
        if self.optimizer not in OPTIMIZERS:
            _fail("optimizer", f"must be one of {OPTIMIZERS}", self.optimizer,
                  "The paper uses sgd.")
        for name in ("learning_rate", "end_learning_rate"):
            v = getattr(self, name)
            if not _is_real(v) or not v > 0 or not math.isfinite(v):
                _fail(name, "must be a finite number > 0", v)
        if self.end_learning_rate > self.learning_rate:
            _fail("end_learning_rate", f"must be <= --learning_rate "
                  f"({self.learning_rate})", self.end_learning_rate)
        if not _is_real(self.momentum) or not 0 <= self.momentum < 1:
            _fail("momentum", "must be in [0, 1)", self.momentum)
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            _fail("weight_decay", "must be >= 0", self.weight_decay)
        if not _is_int(self.train_steps) or self.train_steps < 0:
            _fail("train_steps", "must be an integer >= 0 (0: derive from --epochs)",
                  self.train_steps)
        if not _is_real(self.epochs) or self.epochs < 0:
            _fail("epochs", "must be >= 0", self.epochs)
        if self.train_steps == 0 and self.epochs == 0:
            _fail("train_steps", "or --epochs must be > 0", self.train_steps,
                  "Set one of them, e.g. --train_steps=100000.")
        if self.train_steps == 0 and self.data_source == "random":
            _fail("train_steps", "must be > 0 with --data_source=random (no epochs)",
                  self.train_steps)
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            _fail("warmup_steps", "must be an integer >= 0", self.warmup_steps)
        if self.train_steps and self.warmup_steps >= self.train_steps:
            _fail("warmup_steps", f"must be < --train_steps ({self.train_steps})",
                  self.warmup_steps)
        if not _is_real(self.arcface_margin) or not 0 <= self.arcface_margin <= math.pi / 2:
            _fail("arcface_margin", "must be in [0, pi/2] radians", self.arcface_margin,
                  "The paper uses 0.3.")
        if not _is_real(self.arcface_scale) or not self.arcface_scale > 0:
            _fail("arcface_scale", "must be > 0", self.arcface_scale)
        if self.batchnorm_momentum is not None and (
                not _is_real(self.batchnorm_momentum) or not 0 < self.batchnorm_momentum < 1):
            _fail("batchnorm_momentum", "must be in (0, 1) (or unset: keep the layers' 0.99)",
                  self.batchnorm_momentum)
        if self.precision not in PRECISIONS:
            _fail("precision", f"must be one of {PRECISIONS}", self.precision)
        if self.strategy not in STRATEGIES:
            _fail("strategy", f"must be one of {STRATEGIES}", self.strategy)
        if not _is_real(self.collective_timeout_s) or not self.collective_timeout_s > 0:
            _fail("collective_timeout_s", "must be > 0", self.collective_timeout_s)
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "summary_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, "must be a positive integer", v)
        for name in ("export_scales", "eval_scales"):
            v = getattr(self, name)
            if (not isinstance(v, (tuple, list)) or not v
                    or not all(_is_real(s) and s > 0 for s in v)):
                _fail(name, "must be a non-empty list of numbers > 0", v)
        for name in ("export_max_image_size", "eval_max_image_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 32:
                _fail(name, "must be an integer >= 32", v)
        # Checked again by the export (serving.validate_export_args); here so a bad value
        # fails before training, not after it. 2**23: the export's max_scaled_pixels.
        for name, low in (("export_max_batch_pixels", 2**23), ("export_max_decoded_pixels", 1),
                          ("export_max_image_bytes", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                _fail(name, f"must be an integer >= {low}", v)
        if self.export_max_image_bytes >= 2**31:
            _fail("export_max_image_bytes", "must be < 2**31 (a tf.string offset)",
                  self.export_max_image_bytes)
        if bool(self.eval_dataset) != bool(self.eval_root):
            _fail("eval_root" if self.eval_dataset else "eval_dataset",
                  "must be set together with --eval_dataset / --eval_root",
                  self.eval_root if self.eval_dataset else self.eval_dataset)
        generated_here = (self.data_source == "synthetic" and self.synthetic is not None
                          and os.path.abspath(self.eval_root)
                          == os.path.abspath(self.synthetic.root))
        if self.eval_root and not generated_here and not os.path.isdir(self.eval_root):
            _fail("eval_root", "is not a folder", self.eval_root,
                  "It must hold the evaluation set (e.g. <eval_root>/roxford5k/).")
        if self.eval_untrained and not self.eval_dataset:
            _fail("eval_untrained", "needs --eval_dataset and --eval_root",
                  self.eval_untrained)
        if not _is_int(self.inject_nan_at_step) or (
                self.inject_nan_at_step < 1 and self.inject_nan_at_step != -1):
            _fail("inject_nan_at_step", "must be -1 (off) or a step >= 1",
                  self.inject_nan_at_step)

    def validate_for_replicas(self, num_replicas: int, num_workers: int = 1) -> None:
        """The global batch must split evenly over workers and replicas."""
        b = self.data.global_batch_size
        if b % num_replicas:
            _fail("global_batch_size", f"must be divisible by the number of replicas "
                  f"({num_replicas}: {num_workers} worker(s))", b,
                  f"Use a multiple of {num_replicas}, e.g. "
                  f"{max(num_replicas, b // num_replicas * num_replicas)}.")

    def to_dict(self) -> dict:
        """JSON-able dict of the whole run (written next to the checkpoints)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d
