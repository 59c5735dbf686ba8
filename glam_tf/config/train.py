"""TrainConfig: everything one training run needs, validated before any heavy work.

The paper's recipe (GLAM_SPEC.md "Training recipe") is the default: SGD lr 1e-3,
momentum 0.9, weight decay 1e-5, global batch 64, ArcFace m 0.3 s 30, cosine decay per
step to 3e-6. train_main.py's flags are this class's settings (glam_tf.config.settings).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from glam_tf import files
from glam_tf.config import contract
from glam_tf.config.data import DataConfig, SyntheticConfig
from glam_tf.config.eval import EvalConfig
from glam_tf.config.export import ExportConfig
from glam_tf.config.model import WEIGHTS_KEYWORDS, ModelConfig
from glam_tf.config.settings import (NONEMPTY, check, fail, integer, names_of, nested,
                                     nested_names, number, one_of, reachable, setting,
                                     to_json)

DATA_SOURCES = ("tfrecord", "tfds", "synthetic", "random")
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
_POSITIVE = number(0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, optimizer, schedule, distribution and outputs.

    batchnorm_momentum: short runs from random init need a lower one than Keras' 0.99 (the
    demo: 0.9): with 0.99 the moving statistics trail the fast-changing network by ~100
    steps and the evaluated (inference-mode) model is worse than the trained one.
    The data pipeline's seed is `seed` (one owner: set in __post_init__).
    """

    train_dir: str = setting("", "Output folder: checkpoints/, tensorboard/, "
                             "model_config.json, export/, eval/. Rerunning with the same "
                             "folder resumes.", rule=NONEMPTY,
                             fix="Pass e.g. --train_dir=runs/glam.")
    seed: int = setting(0, "Seed of model initialisation, of the input order and "
                        "augmentation, and of the random data.", rule=integer())
    model: ModelConfig = nested(ModelConfig, "The descriptor model.")
    data_source: str = setting("tfrecord", "tfrecord: --train_file_pattern; tfds: the "
                               "converter's folder --tfds_dir read as a tensorflow-datasets "
                               "dataset (split 'train'); synthetic: "
                               "generate (if absent) and convert the synthetic landmarks at "
                               "--synthetic_root; random: file-less random tensors (tests, "
                               "benchmarks).", rule=one_of(DATA_SOURCES))
    data: DataConfig = nested(DataConfig, "The input pipeline; its global_batch_size is the "
                              "run's.", only=[f.name for f in dataclasses.fields(DataConfig)
                                               if f.name != "seed"],
                              rename={"file_pattern": "train_file_pattern",
                                      "deterministic": "deterministic_data"})
    tfds_dir: str = setting("", "The converter's output folder, a tensorflow-datasets dataset "
                            "(its dataset_info.json names the 'train' shards); "
                            "--data_source=tfds.")
    synthetic: SyntheticConfig = nested(SyntheticConfig, "The synthetic set "
                                        "(--data_source=synthetic).", prefix="synthetic_")
    num_classes: int = setting(0, "ArcFace classes; 0 reads them from the data (converter "
                               "metadata or a label scan).", rule=integer(0),
                               fix="0 reads them from the data.")
    random_image_size: tuple = setting((64, 64), "HEIGHT,WIDTH of the --data_source=random "
                                       "images.", kind="ints")
    optimizer: str = setting("sgd", "sgd (the paper) or adamw (from-scratch demo).",
                             rule=one_of(OPTIMIZERS), fix="The paper uses sgd.")
    learning_rate: float = setting(1e-3, "Peak learning rate (after warmup).", rule=_POSITIVE)
    end_learning_rate: float = setting(3e-6, "Learning rate at the last step (per-step "
                                       "cosine decay).", rule=_POSITIVE)
    warmup_steps: int = setting(0, "Linear warmup steps from 0 to --learning_rate (0: none, "
                                "the paper).", rule=integer(0))
    frozen_backbone_steps: int = setting(
        0, "Head-only warm-up: for the first this many steps the backbone's weights are not "
        "updated (its batch norm runs as in training); GLAM, GeM, the whitening and the "
        "ArcFace head are. Lets a random head align before its gradients reach a pretrained "
        "backbone (0: none, the paper).", rule=integer(0))
    momentum: float = setting(0.9, "SGD momentum.", rule=number(0.0, 1.0, high_open=True))
    weight_decay: float = setting(1e-5, "Decoupled weight decay (w -= lr * wd * w).",
                                  rule=number(0.0))
    train_steps: int = setting(0, "Optimizer steps of the run; 0 derives them from "
                               "--epochs.", rule=integer(0),
                               fix="0 derives them from --epochs.")
    epochs: float = setting(0.0, "Passes over the training images (when --train_steps is 0).",
                            rule=number(0.0))
    arcface_margin: float = setting(0.3, "ArcFace margin m (radians).",
                                    rule=number(0.0, math.pi / 2),
                                    fix="In radians, at most pi/2; the paper uses 0.3.")
    arcface_scale: float = setting(30.0, "ArcFace scale s.", rule=_POSITIVE)
    sync_batchnorm: bool = setting(True, "Batch-norm statistics over the global batch (all "
                                   "replicas).")
    batchnorm_momentum: Optional[float] = setting(
        None, "Moving-average momentum of every batch-norm layer, in (0, 1); unset keeps "
        "Keras' 0.99. Short runs from random init want ~0.9.", kind="float")
    precision: str = setting("float32", "Keras dtype policy for training (evaluation runs "
                             "float32, the export --export_precision); mixed_float16 trains "
                             "with dynamic loss scaling, mixed_bfloat16 needs none.",
                             rule=one_of(PRECISIONS))
    loss_scale: float = setting(2.0 ** 15, "mixed_float16 only: initial dynamic loss scale; "
                                "halved at every step whose gradients overflow (the step "
                                "is skipped), doubled after --loss_scale_growth_steps good "
                                "steps.", rule=_POSITIVE)
    loss_scale_growth_steps: int = setting(2000, "mixed_float16 only: good steps between "
                                           "two doublings of the loss scale.",
                                           rule=integer(1))
    strategy: str = setting("auto", "auto: multi_worker when TF_CONFIG lists several "
                            "workers, mirrored over several local GPUs, else default (one "
                            "device).", rule=one_of(STRATEGIES))
    collective_timeout_s: float = setting(300.0, "Multi-worker collective timeout: a dead "
                                          "peer becomes an error.", rule=_POSITIVE)
    checkpoint_every: int = setting(1000, "Checkpoint every this many steps (also at the end "
                                    "and on SIGTERM).", rule=integer(1))
    keep_checkpoints: int = setting(3, "Checkpoints kept per worker.", rule=integer(1))
    stop_grace_s: float = setting(120.0, "After SIGTERM, seconds the running step has to end "
                                  "(then a checkpoint is saved); a step still running then is "
                                  "stuck (e.g. waiting for data) and the process exits "
                                  "without one. During set-up SIGTERM exits at once.",
                                  rule=_POSITIVE)
    log_every: int = setting(100, "Progress line every this many steps.", rule=integer(1))
    summary_every: int = setting(100, "TensorBoard scalars every this many steps.",
                                 rule=integer(1))
    export: bool = setting(True, "Export the SavedModel to <train_dir>/export at the end.")
    export_settings: ExportConfig = nested(ExportConfig, "The exported signatures and their "
                                           "request limits.", prefix="export_")
    evaluation: EvalConfig = nested(
        EvalConfig, "The evaluation at the end (and at step 0 with --eval_untrained): the "
        "model through the export's signatures, with the export's inference options, at "
        "--eval_scales (empty: --export_scales, what the export serves) on images resized to "
        "--eval_max_image_size.",
        prefix="eval_", only=("dataset", "data_root", "max_image_size", "scales", "visualize",
                              "visualize_attention", "attention_position"),
        rename={"data_root": "root"}, default=EvalConfig())
    eval_untrained: bool = setting(False, "Also evaluate the untrained model at step 0 (same "
                                   "evaluation path; only when the run starts at step 0).")
    inject_nan_at_step: int = setting(-1, "Testing hook: make the loss of this step (1-based) "
                                      "NaN, to exercise the NaN guard; -1: off.",
                                      rule=integer(-1))

    def __post_init__(self):
        if self.data.seed != self.seed:
            object.__setattr__(self, "data", dataclasses.replace(self.data, seed=self.seed))

    @property
    def global_batch_size(self) -> int:
        return self.data.global_batch_size

    def validate(self) -> None:
        """Raises SettingError naming the first bad flag; cheap (no TF).

        Checks that need the strategy (batch divisible by replicas) are in
        `validate_for_replicas`; the existence of data files is checked here.
        """
        cls = type(self)
        names = names_of(cls)
        check(self, names)
        self.model.validate(nested_names(cls, "model"))
        self.data.validate(nested_names(cls, "data"))
        self.export_settings.validate(nested_names(cls, "export_settings"))
        reachable(names["train_dir"], self.train_dir)
        if self.model.weights not in WEIGHTS_KEYWORDS:
            reachable(nested_names(cls, "model")["weights"], self.model.weights)
        if self.data_source == "tfrecord":
            pattern = self.data.file_pattern
            reachable(nested_names(cls, "data")["file_pattern"], pattern)
            if not pattern:
                fail("train_file_pattern", "is required with --data_source=tfrecord",
                     pattern, "Point it at the converter's output, e.g. "
                     "--train_file_pattern=data/gldv2_tfrecord/train-*.")
            if not files.glob(pattern):
                fail("train_file_pattern", "matches no file", pattern,
                     "Convert GLDv2 first (python build_gldv2_main.py --gldv2_root=... "
                     "--output_dir=...) or fix the glob.")
        if self.data_source == "tfds":
            reachable(names["tfds_dir"], self.tfds_dir)
            if not self.tfds_dir:
                fail("tfds_dir", "is required with --data_source=tfds", self.tfds_dir,
                     "Point it at the converter's output folder, e.g. "
                     "--tfds_dir=data/gldv2_tfrecord.")
            if not files.isfile(files.join(self.tfds_dir, "dataset_info.json")):
                fail("tfds_dir", "holds no dataset_info.json (not a tensorflow-datasets "
                     "folder)", self.tfds_dir, "Convert with build_gldv2_main.py, which "
                     "writes it, or use --data_source=tfrecord.")
        if self.data_source == "synthetic":
            self.synthetic.validate(nested_names(cls, "synthetic"))
            if self.synthetic.images_per_landmark < 2:
                fail("synthetic_images_per_landmark", "must be >= 2 to train (a class needs "
                     "several views)", self.synthetic.images_per_landmark)
        if self.data_source == "random":
            if self.num_classes < 1:
                fail("num_classes", "must be > 0 with --data_source=random", self.num_classes)
            size = self.random_image_size
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and v >= 32 for v in size)):
                fail("random_image_size", "must be two integers >= 32 (height, width)", size)
            if self.train_steps == 0:
                fail("train_steps", "must be > 0 with --data_source=random (no epochs)",
                     self.train_steps)
        if self.end_learning_rate > self.learning_rate:
            fail("end_learning_rate", f"must be <= --learning_rate ({self.learning_rate})",
                 self.end_learning_rate)
        if self.train_steps == 0 and self.epochs == 0:
            fail("train_steps", "or --epochs must be > 0", self.train_steps,
                 "Set one of them, e.g. --train_steps=100000.")
        if self.train_steps and self.warmup_steps >= self.train_steps:
            fail("warmup_steps", f"must be < --train_steps ({self.train_steps})",
                 self.warmup_steps)
        if self.train_steps and self.frozen_backbone_steps >= self.train_steps:
            fail("frozen_backbone_steps", f"must be < --train_steps ({self.train_steps})",
                 self.frozen_backbone_steps, "The backbone would never be trained.")
        if self.batchnorm_momentum is not None and not number(
                0.0, 1.0, low_open=True, high_open=True)(self.batchnorm_momentum):
            fail("batchnorm_momentum", "must be in (0, 1) (or unset: keep the layers' 0.99)",
                 self.batchnorm_momentum)
        if self.inject_nan_at_step == 0:
            fail("inject_nan_at_step", "must be -1 (off) or a step >= 1",
                 self.inject_nan_at_step)
        self._validate_evaluation(nested_names(cls, "evaluation"))

    def _validate_evaluation(self, names) -> None:
        ev = self.evaluation
        if bool(ev.dataset) != bool(ev.data_root):
            missing, given = (("data_root", "dataset") if ev.dataset
                              else ("dataset", "data_root"))
            fail(names[missing], f"must be set together with --{names[given]}",
                 getattr(ev, missing))
        if self.eval_untrained and not ev.dataset:
            fail("eval_untrained", "needs --eval_dataset and --eval_root", self.eval_untrained)
        if not ev.dataset:
            return
        self.evaluation_at(0).validate(names, check_model=False)
        generated_here = (self.data_source == "synthetic"
                          and files.absolute(ev.data_root)
                          == files.absolute(self.synthetic.root))
        if not generated_here and not files.isdir(ev.data_root):
            fail(names["data_root"], "is not a folder", ev.data_root,
                 "It must hold the evaluation set (e.g. <eval_root>/roxford5k/).")
        if generated_here and ev.dataset == "synth_val" and not self.synthetic.num_val_landmarks:
            fail(names["dataset"], "needs a validation split in the synthetic set it generates",
                 ev.dataset, "Set --synthetic_num_val_landmarks (e.g. 20), or evaluate on "
                 "--eval_dataset=synth.")

    def validate_for_replicas(self, num_replicas: int, num_workers: int = 1) -> None:
        """The global batch must split evenly over workers and replicas."""
        b = self.data.global_batch_size
        if b % num_replicas:
            fail("global_batch_size", f"must be divisible by the number of replicas "
                 f"({num_replicas}: {num_workers} worker(s))", b,
                 f"Use a multiple of {num_replicas}, e.g. "
                 f"{max(num_replicas, b // num_replicas * num_replicas)}.")

    def evaluation_at(self, step: int) -> EvalConfig:
        """The EvalConfig of the evaluation at `step`: outputs in <train_dir>/eval/step_N;
        the model evaluated with the export's inference options, at the export's scales
        unless --eval_scales names others (what the export serves)."""
        scales = self.evaluation.scales or self.export_settings.scales
        return dataclasses.replace(self.evaluation, scales=tuple(scales),
                                   output_dir=contract.eval_dir(self.train_dir, step),
                                   inference=self.export_settings)

    def to_dict(self) -> dict:
        """JSON-able dict of the whole run (written next to the checkpoints)."""
        return to_json(self)
