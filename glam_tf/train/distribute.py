"""Strategy selection and worker identity for training (TF_NOTES.md "Distribution").

MultiWorkerMirroredStrategy must exist before any TensorFlow op runs, so the main
program calls `make_strategy` first thing; `split_logical_cpus` (testing multi-replica
code on one CPU) must run even earlier.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf


def tf_config_workers() -> int:
    """Number of workers TF_CONFIG lists (chief included); 1 when TF_CONFIG is unset.

    Raises ValueError when TF_CONFIG is not valid JSON (the message quotes it).
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return 1
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster': {raw!r}") from e
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))


def split_logical_cpus(n: int) -> None:
    """Splits the first CPU into `n` logical devices (for multi-replica tests on one CPU).

    Must run before TensorFlow initialises its devices (before any op).
    """
    if n < 1:
        raise ValueError(f"--logical_cpus must be >= 1; received {n}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def make_strategy(kind: str = "auto", *, collective_timeout_s: float = 300.0
                  ) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `kind` (TrainConfig.strategy).

    auto: MultiWorkerMirroredStrategy when TF_CONFIG lists several workers; else
    MirroredStrategy when there are several local GPUs; else the default strategy
    (one device). mirrored: all local GPUs, or all logical CPUs when there is no GPU.
    multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (one worker without it).
    """
    if kind == "auto":
        if tf_config_workers() > 1:
            kind = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multi_worker":
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"--strategy must be one of auto, default, mirrored, multi_worker; "
                     f"received --strategy={kind!r}.")


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """Public name of the strategy's kind, for logs."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "MirroredStrategy"
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return "default strategy"
    return type(strategy).__name__


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Where this process sits in the cluster.

    Attributes:
        num_workers: processes taking part (1 unless multi-worker).
        worker_index: this process's index in [0, num_workers) (input pipeline id).
        is_chief: writes summaries, model_config.json, the export and the evaluation.
        num_replicas: replicas in sync over the whole cluster.
        local_replicas: replicas of this process.
    """

    num_workers: int
    worker_index: int
    is_chief: bool
    num_replicas: int
    local_replicas: int


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
    """WorkerInfo of this process under `strategy`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver:
        spec = resolver.cluster_spec().as_dict()
        task_type, task_id = resolver.task_type, resolver.task_id or 0
        num_workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
        # Workers are numbered chief first, then the "worker" tasks in order.
        index = task_id + (len(spec.get("chief", [])) if task_type == "worker" else 0)
        is_chief = task_type == "chief" or (
            task_type == "worker" and task_id == 0 and "chief" not in spec)
        if num_workers == 0:  # no TF_CONFIG: a one-worker "cluster"
            num_workers, index, is_chief = 1, 0, True
    else:
        num_workers, index, is_chief = 1, 0, True
    try:
        local = len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one replica, no device list
        local = 1
    return WorkerInfo(num_workers=num_workers, worker_index=index, is_chief=is_chief,
                      num_replicas=strategy.num_replicas_in_sync, local_replicas=local)
