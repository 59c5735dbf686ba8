"""Every setting of glam_tf, each owned by one dataclass field (default, help, rule).

No TensorFlow here: the programs check their flags before any heavy import.
"""

from glam_tf.config.contract import (DEFAULT_MAX_IMAGE_SIZE, DEFAULT_SCALES, EXPORT_INFO_FILE,
                                     MIN_IMAGE_SIZE)
from glam_tf.config.data import DataConfig, SyntheticConfig
from glam_tf.config.eval import DATASETS, STAGES, EvalConfig
from glam_tf.config.export import EXPORT_PRECISIONS, ExportConfig
from glam_tf.config.index import INDEX_STORAGES, IndexConfig
from glam_tf.config.model import BACKBONES, VARIANTS, ModelConfig
from glam_tf.config.refine import RefineConfig
from glam_tf.config.settings import SettingError
from glam_tf.config.train import DATA_SOURCES, OPTIMIZERS, PRECISIONS, STRATEGIES, TrainConfig

__all__ = [
    "BACKBONES", "DATASETS", "DATA_SOURCES", "DEFAULT_MAX_IMAGE_SIZE", "DEFAULT_SCALES",
    "DataConfig", "EXPORT_INFO_FILE", "EXPORT_PRECISIONS", "EvalConfig", "ExportConfig",
    "INDEX_STORAGES", "IndexConfig",
    "MIN_IMAGE_SIZE", "ModelConfig", "OPTIMIZERS", "PRECISIONS", "RefineConfig", "STAGES",
    "STRATEGIES", "SettingError", "SyntheticConfig", "TrainConfig", "VARIANTS",
]
