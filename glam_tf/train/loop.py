"""`train(config)`: the whole training run, from data to export and evaluation.

Order of work: validate -> strategy -> data -> model, ArcFace head, optimizer (built
inside strategy.scope()) -> restore the newest checkpoint -> optional evaluation of the
untrained model -> custom loop (progress, TensorBoard, checkpoints every N steps and on
SIGTERM, NaN guard) -> final checkpoint -> SavedModel export -> evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from glam_tf import files
from glam_tf.config import contract
from glam_tf.config.train import TrainConfig
from glam_tf.data.synthetic import DATASET_NAME, VAL_DATASET_NAME
from glam_tf.model import ArcFace, ModelConfig, build_descriptor_model
from glam_tf.train import checkpointing, data as train_data, reporting
from glam_tf.train.distribute import make_strategy, strategy_name, worker_info
from glam_tf.train.step import (make_train_step, set_batchnorm_momentum, unfrozen_variables,
                                set_synchronized_batchnorm)



class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    """What one call of `train` did.

    Attributes:
        start_step: step restored from the checkpoint (0 for a fresh run).
        final_step: step reached.
        total_steps: steps of the whole run.
        stopped_by_signal: SIGTERM stopped the run (checkpoint saved, no export).
        losses, accuracies: step -> global-batch value, for the steps run in this call.
        skipped_steps: steps of this call whose update was skipped because the scaled
            float16 gradients overflowed (mixed_float16 only; the loss scale was halved).
        attention: the learned GeM p and fusion weights at the end.
        num_classes: classes of the ArcFace head (its loss at uniform predictions is
            ln(num_classes): a run still there has not trained).
        export_dir: SavedModel version folder, or None.
        evaluation: evaluator results of the trained model, or None.
        untrained_evaluation: evaluator results at step 0, or None.
        yardstick: the colour histogram's mAP on the same synthetic split
            (glam_tf.eval.yardstick.evaluate: {"whole", "central": {"easy", "medium",
            "hard"}}), or None for another test set.
        wall_time_s: seconds spent in `train`.
    """

    start_step: int
    final_step: int
    total_steps: int
    stopped_by_signal: bool = False
    losses: dict = dataclasses.field(default_factory=dict)
    accuracies: dict = dataclasses.field(default_factory=dict)
    skipped_steps: list = dataclasses.field(default_factory=list)
    attention: dict = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    export_dir: Optional[str] = None
    evaluation: Optional[dict] = None
    untrained_evaluation: Optional[dict] = None
    yardstick: Optional[dict] = None
    wall_time_s: float = 0.0


# The synthetic set's revisited splits: the demo's closing lines give the colour
# histogram's mAP there beside the model's.
SYNTHETIC_SPLITS = (DATASET_NAME, VAL_DATASET_NAME)


def make_schedule(config: TrainConfig, total_steps: int
                  ) -> keras.optimizers.schedules.LearningRateSchedule:
    """Per-step cosine decay from learning_rate to end_learning_rate at total_steps.

    With warmup_steps, a linear warmup from 0 comes first (Keras CosineDecay warmup).
    """
    decay_steps = max(1, total_steps - config.warmup_steps)
    alpha = config.end_learning_rate / config.learning_rate
    if config.warmup_steps:
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=decay_steps, alpha=alpha,
            warmup_target=config.learning_rate, warmup_steps=config.warmup_steps)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate, decay_steps=decay_steps, alpha=alpha)
    return schedule


def make_optimizer(config: TrainConfig, schedule) -> keras.optimizers.Optimizer:
    """SGD (paper) or AdamW on `schedule`; weight decay is decoupled (w -= lr * wd * w).

    Under --precision=mixed_float16 the optimizer is wrapped in Keras 3's
    LossScaleOptimizer (dynamic scale from --loss_scale, doubled every
    --loss_scale_growth_steps good steps, halved and the step skipped on inf/NaN
    gradients); its scale is an optimizer variable, so checkpoints carry it. float16
    keeps 5 exponent bits (smallest subnormal 6e-8): small gradients underflow without
    the scale. mixed_bfloat16 needs no loss scaling: bfloat16 has float32's 8 exponent
    bits (range down to ~1e-38), so its gradients do not underflow; it loses mantissa,
    not range.

    Call inside strategy.scope() (Keras 3 optimizers bind the current strategy).
    """
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum,
                                         weight_decay=weight_decay)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule,
                                           weight_decay=config.weight_decay)
    else:
        raise ValueError(f"--optimizer must be sgd or adamw; received {config.optimizer!r}.")
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=config.loss_scale,
            dynamic_growth_steps=config.loss_scale_growth_steps)
    return optimizer


def loss_scale(optimizer: keras.optimizers.Optimizer) -> Optional[float]:
    """The current dynamic loss scale of a LossScaleOptimizer; None for other optimizers."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(np.asarray(optimizer.dynamic_scale.numpy()))
    return None


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets the global Keras dtype policy for the block, restoring the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _plain_float32_copy(model: keras.Model, config: TrainConfig, model_fn) -> keras.Model:
    """The trained weights in a float32 model outside any strategy (export, evaluation)."""
    model_config = dataclasses.replace(config.model, weights="none")
    with dtype_policy("float32"):
        copy = model_fn(model_config)
    copy.set_weights([np.asarray(w) for w in model.get_weights()])
    return copy


@dataclasses.dataclass
class _Run:
    """The live objects of a run (built under the strategy, restored from a checkpoint)."""

    model: keras.Model
    head: ArcFace
    optimizer: keras.optimizers.Optimizer
    schedule: keras.optimizers.schedules.LearningRateSchedule
    step: tf.Variable
    iterator: object
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    recovery: checkpointing.Recovery
    data_stats: Optional[tf.Module] = None


def _build_run(config: TrainConfig, strategy, worker, source, total_steps: int,
               model_fn) -> _Run:
    """Model, ArcFace head and optimizer (slots built) inside strategy.scope(); checkpoint."""
    keras.utils.set_random_seed(config.seed)
    with dtype_policy(config.precision), strategy.scope():
        model = model_fn(config.model)
        if config.sync_batchnorm:
            logging.info("Synchronized %d BatchNormalization layers.",
                         set_synchronized_batchnorm(model))
        if config.batchnorm_momentum is not None:
            logging.info("BatchNormalization momentum %g in %d layers.",
                         config.batchnorm_momentum,
                         set_batchnorm_momentum(model, config.batchnorm_momentum))
        head = ArcFace(source.num_classes, margin=config.arcface_margin,
                       scale=config.arcface_scale, name="arcface", dtype="float32")
        head.build((None, config.model.embedding_dim))
        schedule = make_schedule(config, total_steps)
        optimizer = make_optimizer(config, schedule)
        optimizer.build(model.trainable_variables + head.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    iterator = iter(source.dataset)
    extra = {"data_stats": source.decode_stats} if source.decode_stats is not None else {}
    checkpoint = tf.train.Checkpoint(model=model, head=head, optimizer=optimizer,
                                     step=step, iterator=iterator, **extra)
    directory = checkpointing.checkpoint_dir(config.train_dir, worker)
    recovery = checkpointing.recover(directory)  # before the manager reads the state file
    manager = tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=config.keep_checkpoints,
        checkpoint_name=checkpointing.CHECKPOINT_NAME)
    return _Run(model, head, optimizer, schedule, step, iterator, checkpoint, manager,
                recovery, source.decode_stats)


def _restore(run: _Run, strategy, worker) -> int:
    """Restores the newest common checkpoint; returns its step (0 for a fresh run)."""
    checkpointing.remove_unfinished_checkpoints(run.manager)
    start_step = checkpointing.restore_latest(run.checkpoint, run.manager,
                                              strategy, worker, run.recovery)
    if start_step:
        logging.info("Resumed from %s at step %d (optimizer iterations %d).",
                     run.manager.directory, start_step,
                     int(run.optimizer.iterations.numpy()))
    elif run.recovery.damaged:
        logging.warning("Every checkpoint in %s was damaged (moved aside): starting at "
                        "step 0.", run.manager.directory)
    else:
        logging.info("No checkpoint in %s: starting at step 0.", run.manager.directory)
    if int(run.step.numpy()) != start_step:
        raise RuntimeError(f"Checkpoint step counter {int(run.step.numpy())} does not match "
                           f"its file number {start_step} in {run.manager.directory}.")
    return start_step


def _loop(config: TrainConfig, run: _Run, strategy, worker, result: TrainResult,
          stop_signal: checkpointing.StopSignal) -> None:
    """Steps from result.final_step to result.total_steps (or a SIGTERM); updates result."""
    def step_function(variables=None):
        return make_train_step(
            strategy, run.model, run.head, run.optimizer, run.step,
            global_batch_size=config.global_batch_size, local_replicas=worker.local_replicas,
            inject_nan_at_step=config.inject_nan_at_step, variables=variables)

    train_step = step_function()
    frozen_steps = config.frozen_backbone_steps
    head_step = None
    if result.final_step < frozen_steps:
        head_variables = unfrozen_variables(run.model, run.head)
        head_step = step_function(head_variables)
        logging.info("Backbone frozen until step %d: %d of %d trainable variables updated.",
                     frozen_steps, len(head_variables),
                     len(run.model.trainable_variables + run.head.trainable_variables))
    writer = (tf.summary.create_file_writer(contract.tensorboard_dir(config.train_dir))
              if worker.is_chief else tf.summary.create_noop_writer())
    progress = reporting.Progress(total_steps=result.total_steps, start_step=result.final_step,
                                  global_batch_size=config.global_batch_size)
    current, total = result.final_step, result.total_steps
    iterations = int(run.optimizer.iterations.numpy())  # lags `current` by skipped steps
    stop_signal.start_stepping()
    with writer.as_default():
        while current < total:
            step_fn = head_step if current < frozen_steps else train_step
            loss, accuracy, votes = step_fn(
                run.iterator, tf.constant(int(stop_signal.requested), tf.int32))
            current += 1
            if current == frozen_steps:
                logging.info("Step %d: the backbone trains from the next step on.", current)
            loss_value = float(loss.numpy())
            if not math.isfinite(loss_value):
                writer.flush()
                raise NonFiniteLossError(
                    f"The loss is {loss_value} at step {current}: training stopped. The "
                    f"last good checkpoint is kept: {run.manager.latest_checkpoint}. Lower "
                    f"--learning_rate (now {config.learning_rate}) or add --warmup_steps, "
                    "then rerun the same command to resume from that checkpoint.")
            result.final_step = current
            result.losses[current] = loss_value
            result.accuracies[current] = float(accuracy.numpy())
            scale = loss_scale(run.optimizer)
            applied = int(run.optimizer.iterations.numpy())
            if applied == iterations:  # a finite loss, overflowing scaled gradients
                result.skipped_steps.append(current)
                logging.warning("Step %d: the float16 gradients overflowed; update skipped, "
                                "loss scale lowered to %g.", current, scale)
            iterations = applied
            progress.update(current, loss_value, result.accuracies[current])
            lr = float(run.schedule(max(0, iterations - 1)))  # the last update's rate
            if current % config.log_every == 0 or current == total:
                logging.info("%s", progress.line(lr))
            if current % config.summary_every == 0 or current == total:
                reporting.write_scalars(current, loss_value, result.accuracies[current], lr,
                                        run.model, progress.images_per_second(),
                                        data_stats=run.data_stats, loss_scale=scale)
            stop = int(votes.numpy()) > 0
            if stop:
                stop_signal.finishing()
            if current % config.checkpoint_every == 0 or current == total or stop:
                writer.flush()  # summaries up to the checkpoint survive a kill
                run.manager.save(checkpoint_number=current)
            if stop:
                logging.warning("Stopped by SIGTERM at step %d/%d; checkpoint %s saved. "
                                "Rerun the same command to resume.", current, total,
                                run.manager.latest_checkpoint)
                result.stopped_by_signal = True
                break
        writer.flush()


def train(config: TrainConfig, strategy: Optional[tf.distribute.Strategy] = None, *,
          model_fn: Callable[[ModelConfig], keras.Model] = build_descriptor_model
          ) -> TrainResult:
    """Runs (or resumes) the training run `config` describes; see the module docstring.

    Args:
        config: the run; validated first.
        strategy: a tf.distribute strategy; None makes one from config.strategy (a
            MultiWorkerMirroredStrategy must already exist before any TF op: the main
            program creates it first and passes it).
        model_fn: ModelConfig -> descriptor model (same contract as
            build_descriptor_model); tests pass a small stand-in
            (tests/keras_helpers.py) where the backbone does not matter.

    Returns:
        TrainResult.

    Raises:
        SettingError: a bad config value (names the flag).
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    t_start = time.monotonic()
    config.validate()
    if strategy is None:
        strategy = make_strategy(config.strategy,
                                 collective_timeout_s=config.collective_timeout_s)
    worker = worker_info(strategy)
    config.validate_for_replicas(worker.num_replicas, worker.num_workers)
    logging.info("%s: %d replica(s), %d worker(s); this is worker %d%s.",
                 strategy_name(strategy), worker.num_replicas, worker.num_workers,
                 worker.worker_index, " (chief)" if worker.is_chief else "")
    files.ensure_writable_dir(config.train_dir, "--train_dir")  # refuses before heavy work

    # From here until the loop ends, SIGTERM during set-up exits at once (nothing to save);
    # while stepping it sets a flag: the loop checkpoints and returns after the running step,
    # or the process exits if that step is stuck for stop_grace_s.
    with checkpointing.StopSignal(grace_s=config.stop_grace_s) as stop_signal:
        source = train_data.prepare(config, worker)
        total_steps = config.train_steps or max(
            1, math.ceil(config.epochs * source.num_examples / config.global_batch_size))
        logging.info("Training data: %s; %d classes; %d steps of %d images.",
                     source.description, source.num_classes, total_steps,
                     config.global_batch_size)
        run = _build_run(config, strategy, worker, source, total_steps, model_fn)
        start_step = _restore(run, strategy, worker)
        if source.decode_stats is not None:  # this start's shard check, not the checkpoint's
            source.decode_stats.record_damage(source.shard_reports)
        result = TrainResult(start_step=start_step, final_step=start_step,
                             total_steps=total_steps, num_classes=source.num_classes)
        if worker.is_chief:
            files.write_json_atomic(contract.model_config_path(config.train_dir),
                              config.model.to_dict())
            files.write_json_atomic(contract.train_config_path(config.train_dir),
                              config.to_dict())
            if config.eval_untrained and start_step == 0:
                logging.info("Evaluating the untrained model (step 0).")
                result.untrained_evaluation = _evaluate(
                    _plain_float32_copy(run.model, config, model_fn), config, step=0)
            elif config.eval_untrained:
                from glam_tf.eval import read_results  # noqa: PLC0415 (optional stage)

                result.untrained_evaluation = read_results(config.evaluation_at(0))
        _loop(config, run, strategy, worker, result, stop_signal)
    if source.decode_stats is not None:
        source.decode_stats.log()
    result.attention = reporting.attention_scalars(run.model)
    logging.info("Learned pooling and fusion: %s", reporting.format_attention(result.attention))

    if worker.is_chief and not result.stopped_by_signal:
        _export_and_evaluate(config, run.model, result, model_fn)
    result.wall_time_s = time.monotonic() - t_start
    return result


def _evaluate(model: keras.Model, config: TrainConfig, *, step: int) -> dict:
    """Retrieval evaluation of `model` at `step` (outputs in <train_dir>/eval/step_<step>):
    the untrained and the trained model go through this same in-memory eval back-end."""
    from glam_tf.eval import evaluate_model  # noqa: PLC0415 (optional stage)

    return evaluate_model(model, config.evaluation_at(step),
                          tag=f"{files.absolute(config.train_dir)}@step_{step}")


def _export_and_evaluate(config: TrainConfig, model: keras.Model, result: TrainResult,
                         model_fn) -> None:
    """Chief, after training: SavedModel export, then evaluation (and its comparison)."""
    final_model = _plain_float32_copy(model, config, model_fn)
    if config.export:
        from glam_tf.export import export_saved_model  # noqa: PLC0415 (optional stage)

        result.export_dir = export_saved_model(
            final_model, contract.export_dir(config.train_dir),
            config.export_settings)
        logging.info("Exported the SavedModel to %s", result.export_dir)
    if config.evaluation.dataset:
        result.evaluation = _evaluate(final_model, config, step=result.final_step)
        if result.untrained_evaluation is not None:
            print(f"Untrained (step 0): "
                  f"{reporting.map_summary(result.untrained_evaluation)}\n"
                  f"Trained (step {result.final_step}): "
                  f"{reporting.map_summary(result.evaluation)}", flush=True)
        if config.evaluation.dataset in SYNTHETIC_SPLITS:
            # What no learning reaches on the same split: a trained line near these has
            # learned little that colour or position does not already give.
            from glam_tf.eval import yardstick  # noqa: PLC0415 (optional stage)

            result.yardstick = yardstick.evaluate(config.evaluation.data_root,
                                                  config.evaluation.dataset)
            print(yardstick.format_lines(result.yardstick), flush=True)
