"""Export a SavedModel from a training directory: model_config.json + latest checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import logging

from glam_tf import files
from glam_tf.config import contract
from glam_tf.export import serving
from glam_tf.model import ModelConfig, build_descriptor_model


def read_model_config(train_dir) -> ModelConfig:
    """`<train_dir>/model_config.json` as a validated ModelConfig with weights="none".

    The backbone's ImageNet weights are not needed (the checkpoint holds every weight), so
    the rebuild never downloads or reads a weights file.

    Raises:
        FileNotFoundError: train_dir or the config file is missing.
        ValueError: the file is not JSON or not a valid ModelConfig (names the file).
    """
    train_dir = os.fspath(train_dir)
    if not files.isdir(train_dir):
        raise FileNotFoundError(f"train_dir {train_dir!r} does not exist or is not a "
                                "directory; pass the directory training wrote to.")
    path = contract.model_config_path(train_dir)
    if not files.isfile(path):
        raise FileNotFoundError(f"{path} is missing: training writes it (ModelConfig.to_dict) "
                                "next to checkpoints/; is train_dir the right directory?")
    try:
        with files.open_file(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        config = ModelConfig.from_dict(raw)
        config = dataclasses.replace(config, weights="none")
        config.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} does not hold a valid ModelConfig: {e}") from e
    return config


def restore_descriptor_model(train_dir, *, config=None, prefix=None):
    """Rebuilds a training run's descriptor model (weights "none") and restores its weights.

    Restores `tf.train.Checkpoint(model=model)` from `prefix` (default: the latest
    checkpoint in `<train_dir>/checkpoints`), ignoring the other checkpointed objects
    (optimizer, data iterator: expect_partial), and checks every model variable was found.

    Returns:
        `(model, config, prefix)`: the restored keras.Model, its ModelConfig, the checkpoint.
    """
    config = read_model_config(train_dir) if config is None else config
    prefix = contract.latest_checkpoint(train_dir) if prefix is None else prefix
    logging.info("Building %s / %s and restoring %s", config.backbone, config.variant, prefix)
    model = build_descriptor_model(config)
    status = tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"checkpoint {prefix} does not hold every weight of the model "
                         f"described by {contract.model_config_path(train_dir)} (was it "
                         f"written by another config, or without the key 'model'?): {e}"
                         ) from None
    return model, config, prefix


def export_from_checkpoint(train_dir, export_dir, config=None, *, version=None,
                           **settings) -> str:
    """Rebuilds the descriptor model of a training run, restores it, exports a SavedModel.

    Reads `<train_dir>/model_config.json`, builds the model with weights="none", restores
    `tf.train.Checkpoint(model=model)` from the latest checkpoint in `<train_dir>/checkpoints`
    (other checkpointed objects such as the optimizer are ignored: expect_partial), checks
    every model variable was found in it, and writes `<export_dir>/<version>/` with
    export_saved_model. Every argument and file is checked before the model is built.

    Args:
        train_dir: training output directory.
        export_dir: SavedModel base path (TF Serving's model_base_path).
        config / **settings: the export-time settings (glam_tf.config.ExportConfig, fields
            replaced by name).
        version: version folder number; None = next free.

    Returns:
        The version folder path.
    """
    model_config = read_model_config(train_dir)
    prefix = contract.latest_checkpoint(train_dir)
    config = serving.export_config(config, **settings)
    version = contract.resolve_version(export_dir, version)

    model, _, _ = restore_descriptor_model(train_dir, config=model_config, prefix=prefix)
    return serving.export_saved_model(
        model, export_dir, config, version=version,
        extra_info={"model_config": model_config.to_dict(),
                    "checkpoint": files.absolute(prefix)})
