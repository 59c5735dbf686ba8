"""Training: strategy selection, the custom distributed loop, checkpoints (TrainConfig in
glam_tf.config)."""

from glam_tf.config import SettingError, TrainConfig
from glam_tf.train.distribute import make_strategy, split_logical_cpus, worker_info
from glam_tf.train.loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "make_strategy", "NonFiniteLossError", "SettingError", "split_logical_cpus", "train",
    "TrainConfig", "TrainResult", "worker_info",
]
