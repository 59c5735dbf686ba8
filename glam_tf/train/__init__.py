"""Training: TrainConfig, strategy selection, the custom distributed loop, checkpoints."""

from glam_tf.train.config import SyntheticDataConfig, TrainConfig, TrainConfigError
from glam_tf.train.distribute import make_strategy, split_logical_cpus, worker_info
from glam_tf.train.loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "make_strategy", "NonFiniteLossError", "split_logical_cpus", "SyntheticDataConfig",
    "train", "TrainConfig", "TrainConfigError", "TrainResult", "worker_info",
]
