"""ResNet backbones from keras.applications, cut at conv5 (stride 32, 2048 channels)."""

import contextlib
import os
import re

import keras

from glam_tf import files
from glam_tf.config.model import BACKBONES
from glam_tf.model.weights_file import (WeightsFileError, assign_backbone_weights,
                                        open_weights_file)
from glam_tf.refusal import BadInput

_APPLICATIONS = {
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}
# Where keras.applications downloads the ResNet v1 weights from, and the MD5 of each no-top
# file: BASE_WEIGHTS_PATH and WEIGHTS_HASHES[name][1] of keras/src/applications/resnet.py
# (Keras 3.15), held here because Keras exports neither.
IMAGENET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
IMAGENET_NOTOP_MD5 = {
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
}


class BackboneWeightsError(BadInput, RuntimeError):
    """The backbone's weights could not be found, fetched or loaded (bad input: a program
    exits with status 2 and this one line)."""


def imagenet_weights_file(name):
    """File name Keras uses for the no-top ImageNet weights of backbone `name`."""
    return f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def keras_home():
    """Keras' home folder: `$KERAS_HOME`, else `~/.keras`, else `/tmp/.keras` when the home
    directory is not writable (the rule of keras/src/backend/config.py, which has no public
    accessor)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = files.expanduser("~")
    return files.join(base if files.local_writable(base) else "/tmp", ".keras")


def keras_models_dir():
    """The folder the ImageNet weights are cached in (`keras_home()/models`)."""
    return files.join(files.expanduser(keras_home()), "models")


def _fetch_imagenet_weights(name):
    file_name = imagenet_weights_file(name)
    cache_dir = keras_models_dir()
    try:
        return keras.utils.get_file(
            file_name, IMAGENET_WEIGHTS_URL + file_name, cache_dir=keras_home(),
            cache_subdir="models", file_hash=IMAGENET_NOTOP_MD5.get(name))
    except Exception as e:  # noqa: BLE001 - get_file raises bare Exception on URL errors
        raise BackboneWeightsError(
            f"Could not get the ImageNet weights of backbone '{name}': the file "
            f"{file_name} is not in the Keras cache ({files.join(cache_dir, file_name)}) "
            f"and downloading it from {IMAGENET_WEIGHTS_URL + file_name} failed "
            f"({type(e).__name__}: {e}). Fixes: copy {file_name} to "
            f"~/.keras/models/{file_name} (or $KERAS_HOME/models/ when KERAS_HOME is set; "
            f"here: {cache_dir}); or pass --weights=none for random initialisation; or "
            f"pass --weights=/path/to/{file_name} to load a local copy.") from e


def _check_weights_path(name, path):
    """Refuses a --weights path that is not a file, before anything is read."""
    if files.isdir(path):
        raise BackboneWeightsError(
            f"--weights={path!r} is a directory, not a weights file (backbone '{name}'). "
            f"Pass the .h5 file itself, e.g. {files.join(path, imagenet_weights_file(name))}.")
    if not files.isfile(path):
        raise BackboneWeightsError(
            f"Backbone weights file not found: --weights={path!r} (backbone '{name}'). "
            f"Pass an existing .h5 file holding keras.applications."
            f"{_APPLICATIONS[name]} weights (with or without top, e.g. "
            f"{imagenet_weights_file(name)}), a backbone saved by this project "
            f"(.weights.h5), or --weights=imagenet / --weights=none.")


# The BatchNorm closing the residual branch of a keras.applications ResNet v1 bottleneck block.
_LAST_BLOCK_BN = re.compile(r"conv\d+_block\d+_3_bn$")


def zero_init_residual_branches(backbone):
    """Zeroes gamma of every bottleneck block's last BatchNorm; returns how many.

    Each block then computes relu(shortcut(x)) until training moves gamma: the random
    network starts as a shallow one (ModelConfig.zero_init_residual).
    """
    count = 0
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and _LAST_BLOCK_BN.match(
                layer.name):
            layer.gamma.assign(keras.ops.zeros_like(layer.gamma))
            count += 1
    if count == 0:
        raise ValueError(f"zero_init_residual_branches: no layer of '{backbone.name}' is a "
                         f"bottleneck block's last BatchNorm (conv<i>_block<j>_3_bn).")
    return count


def build_backbone(name="resnet101", weights="imagenet", *, model_name="backbone",
                   zero_init_residual=False):
    """Builds the conv5 feature extractor of a keras.applications ResNet.

    Args:
        name: one of BACKBONES.
        weights: "imagenet" (from the Keras cache ~/.keras/models, downloaded when
            missing), "none" (random initialisation) or the path (local or tf.io.gfile) of a
            weights file of the same architecture: keras.applications' downloaded `.h5`
            with or without its top, or a backbone saved by this project (`.weights.h5`);
            read by layer name (glam_tf.model.weights_file).
        model_name: name of the returned model (the descriptor model uses "backbone").
        zero_init_residual: with weights "none", start every bottleneck block as its
            shortcut (`zero_init_residual_branches`).

    Returns:
        keras.Model mapping caffe-preprocessed `(B, H, W, 3)` images to conv5 features
        `(B, ceil(H/32), ceil(W/32), 2048)`.

    Raises:
        ValueError: unknown name.
        BackboneWeightsError: ImageNet weights neither cached nor downloadable (the
            message names the file and where to put it), or a weights path that is
            missing or does not fit the architecture.
    """
    if name not in BACKBONES:
        raise ValueError(f"build_backbone: `name` must be one of {BACKBONES}; received "
                         f"name={name!r}. Use e.g. --backbone=resnet101.")
    if not isinstance(weights, str):
        raise ValueError(f"build_backbone: `weights` must be 'imagenet', 'none' or a .h5 "
                         f"path; received weights={weights!r}.")
    with contextlib.ExitStack() as stack:
        saved = None
        if weights != "none":
            path = _fetch_imagenet_weights(name) if weights == "imagenet" else weights
            _check_weights_path(name, path)
            try:  # a bad file fails before the build
                saved = stack.enter_context(open_weights_file(path))
            except WeightsFileError as e:
                raise BackboneWeightsError(str(e)) from None
        application = getattr(keras.applications, _APPLICATIONS[name])
        model = application(include_top=False, weights=None, input_shape=(None, None, 3),
                            name=model_name)
        if saved is not None:
            try:
                assign_backbone_weights(model, saved, f"backbone '{name}' (keras."
                                        f"applications.{_APPLICATIONS[name]})")
            except WeightsFileError as e:
                raise BackboneWeightsError(str(e)) from None
        elif zero_init_residual:
            zero_init_residual_branches(model)
    return model
