"""ResNet backbones from keras.applications, cut at conv5 (stride 32, 2048 channels)."""

import os
import re

import keras

from glam_tf.model.config import BACKBONES

_APPLICATIONS = {
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "resnet152": "ResNet152",
}
# Where keras.applications downloads the ResNet v1 weights from (keras/src/applications/resnet.py).
IMAGENET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"


class BackboneWeightsError(RuntimeError):
    """The backbone's weights could not be found, fetched or loaded."""


def imagenet_weights_file(name):
    """File name Keras uses for the no-top ImageNet weights of backbone `name`."""
    return f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def keras_models_dir():
    """The folder keras.utils.get_file caches application weights in (`$KERAS_HOME/models`)."""
    try:
        from keras.src.backend.config import keras_home
        home = keras_home()
    except ImportError:  # private API moved: fall back to Keras' documented default
        home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
    return os.path.join(os.path.expanduser(home), "models")


def _imagenet_file_hash(name):
    try:
        from keras.src.applications.resnet import WEIGHTS_HASHES
        return WEIGHTS_HASHES[name][1]
    except (ImportError, KeyError):
        return None


def _fetch_imagenet_weights(name):
    file_name = imagenet_weights_file(name)
    cache_dir = keras_models_dir()
    try:
        return keras.utils.get_file(
            file_name, IMAGENET_WEIGHTS_URL + file_name, cache_subdir="models",
            file_hash=_imagenet_file_hash(name))
    except Exception as e:  # noqa: BLE001 - get_file raises bare Exception on URL errors
        raise BackboneWeightsError(
            f"Could not get the ImageNet weights of backbone '{name}': the file "
            f"{file_name} is not in the Keras cache ({os.path.join(cache_dir, file_name)}) "
            f"and downloading it from {IMAGENET_WEIGHTS_URL + file_name} failed "
            f"({type(e).__name__}: {e}). Fixes: copy {file_name} to "
            f"~/.keras/models/{file_name} (or $KERAS_HOME/models/ when KERAS_HOME is set; "
            f"here: {cache_dir}); or pass --weights=none for random initialisation; or "
            f"pass --weights=/path/to/{file_name} to load a local copy.") from e


def _short(error, limit=400):
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_weights_file(model, name, path):
    if not os.path.isfile(path):
        raise BackboneWeightsError(
            f"Backbone weights file not found: --weights={path!r} (backbone '{name}'). "
            f"Pass an existing .h5 file holding keras.applications."
            f"{_APPLICATIONS[name]}(include_top=False) weights, e.g. "
            f"{imagenet_weights_file(name)}, or --weights=imagenet / --weights=none.")
    try:
        model.load_weights(path)
    except Exception as e:  # noqa: BLE001 - h5py/keras raise many types for a bad file
        raise BackboneWeightsError(
            f"Could not load --weights={path!r} into backbone '{name}' "
            f"(keras.applications.{_APPLICATIONS[name]}, include_top=False): "
            f"{type(e).__name__}: {_short(e)} The file must hold weights of exactly that "
            f"architecture without its top, like {imagenet_weights_file(name)}; check the "
            f"--backbone / --weights pair.") from e


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
            missing), "none" (random initialisation) or the path of a .h5 weights file
            of the same architecture without top.
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
    path = None
    if weights == "imagenet":
        path = _fetch_imagenet_weights(name)
    elif weights != "none":
        path = weights
        if not os.path.isfile(path):  # fail before spending time on the build
            _load_weights_file(None, name, path)
    application = getattr(keras.applications, _APPLICATIONS[name])
    model = application(include_top=False, weights=None, input_shape=(None, None, 3),
                        name=model_name)
    if path is not None:
        _load_weights_file(model, name, path)
    elif zero_init_residual:
        zero_init_residual_branches(model)
    return model
