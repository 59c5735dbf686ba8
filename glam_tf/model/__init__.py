"""GLAM descriptor model: attention layers, pooling, head, ArcFace, builder (ModelConfig in
glam_tf.config)."""

from glam_tf.model.arcface import ArcFace, arcface_logits
from glam_tf.model.attention import (
    GlobalChannelAttention,
    GlobalSpatialAttention,
    LocalChannelAttention,
    LocalSpatialAttention,
)
from glam_tf.model.backbone import BackboneWeightsError, build_backbone, imagenet_weights_file
from glam_tf.config.model import BACKBONES, VARIANTS, ModelConfig
from glam_tf.model.builder import all_layers, build_descriptor_model, inference_model
from glam_tf.model.glam import MODULE_VARIANTS, GlamModule
from glam_tf.model.head import EmbeddingHead, l2_normalize
from glam_tf.model.pooling import GeM, RegionalGeM, gem, regional_gem
from glam_tf.model.preprocessing import CaffePreprocess

__all__ = [
    "all_layers", "ArcFace", "arcface_logits", "BACKBONES", "BackboneWeightsError",
    "build_backbone", "build_descriptor_model", "CaffePreprocess", "EmbeddingHead", "GeM",
    "gem", "GlamModule", "GlobalChannelAttention", "GlobalSpatialAttention",
    "imagenet_weights_file", "inference_model", "l2_normalize", "LocalChannelAttention",
    "LocalSpatialAttention", "ModelConfig", "MODULE_VARIANTS", "RegionalGeM",
    "regional_gem", "VARIANTS",
]
