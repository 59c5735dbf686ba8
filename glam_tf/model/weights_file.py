"""Backbone weights from a file: keras.applications' downloaded `.h5` (with or without its
top) or a backbone this project saved (`.weights.h5`), checked layer by layer.

Two layouts are read (h5py), both keyed by layer name, never by position, so the
classifier of a with-top file is skipped and a file of another architecture is named at
its first layer that does not fit:

- legacy (Keras 2's `save_weights`, the files keras.applications downloads, e.g.
  resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5): root attribute `layer_names`;
  group `<layer>` with attribute `weight_names` (`<layer>/kernel:0`, ...) naming its
  datasets. A full-model file keeps them under `model_weights/`.
- Keras 3 (`Model.save_weights("x.weights.h5")`): `layers/<key>/vars/<i>`, the group
  `vars` carrying the layer's name in attribute `name`.

Keras' own `load_weights` matches legacy files by position (a with-top file fails on its
layer count) and Keras 3 files by position within class, with messages that name neither
the file nor the layer.
"""

from __future__ import annotations

import dataclasses
import re

import h5py
import numpy as np

from glam_tf import files


class WeightsFileError(ValueError):
    """A weights file that does not fit the backbone: names the file and the first layer."""


def _decode(values) -> list:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _legacy_layers(group) -> list:
    """[(layer name, [(weight name, array), ...])] of a legacy group, in saved order."""
    layers = []
    for name in _decode(group.attrs["layer_names"]):
        weight_names = _decode(group[name].attrs.get("weight_names", []))
        if weight_names:
            layers.append((name, [(w, np.asarray(group[name][w])) for w in weight_names]))
    return layers


def _keras3_layers(group) -> list:
    """[(layer name, [(index, array), ...])] of a Keras 3 weights file, nested models
    flattened; layers in the natural order of their keys."""
    layers = []
    for key in sorted(group, key=_natural_key):
        entry = group[key]
        if "vars" in entry and len(entry["vars"]):
            variables = entry["vars"]
            layers.append((str(variables.attrs.get("name", key)),
                           [(i, np.asarray(variables[i]))
                            for i in sorted(variables, key=int)]))
        if "layers" in entry:
            layers.extend(_keras3_layers(entry["layers"]))
    return layers


def read_layers(f) -> tuple:
    """(layout, [(layer name, [(weight name or index, array)])]) of an open h5 file."""
    if "layer_names" in f.attrs:
        return "legacy", _legacy_layers(f)
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        return "legacy", _legacy_layers(f["model_weights"])
    if "layers" in f:
        return "keras3", _keras3_layers(f["layers"])
    raise WeightsFileError("holds neither Keras weights layout (no root attribute "
                           "'layer_names', no group 'model_weights' or 'layers')")


def _variable_name(weight_name) -> str:
    """'conv1_conv/kernel:0' -> 'kernel'; an index stays a str of itself."""
    return str(weight_name).rsplit("/", 1)[-1].split(":", 1)[0]


def _match(layer, saved: list, label: str) -> list:
    """The saved arrays of `layer` in the order of its variables; raises on a mismatch."""
    variables = layer.trainable_weights + layer.non_trainable_weights
    names = [v.name for v in variables]
    by_name = {_variable_name(w): a for w, a in saved}
    if len(saved) != len(variables):
        raise WeightsFileError(
            f"layer {layer.name!r} has {len(variables)} weights ({', '.join(names)}), the "
            f"file {len(saved)} ({', '.join(str(w) for w, _ in saved)})")
    arrays = ([by_name[n] for n in names] if set(by_name) == set(names)
              else [a for _, a in saved])
    for variable, array in zip(variables, arrays):
        if tuple(variable.shape) != tuple(array.shape):
            raise WeightsFileError(
                f"layer {layer.name!r} weight {variable.name!r} has shape "
                f"{tuple(variable.shape)} in {label}, {tuple(array.shape)} in the file")
    return list(zip(variables, arrays))


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """The layers of a weights file, read into memory: `layers` is
    [(layer name, [(weight name or index, array), ...])] in the file's order."""

    path: str
    layout: str
    layers: list


def read_weights_file(path: str) -> WeightsFile:
    """Reads `path` (local or tf.io.gfile) before any model is built: a file that is not
    a Keras weights file fails first.

    Raises:
        WeightsFileError: not HDF5, or neither layout (the message names the file).
    """
    try:
        with files.local_copy(path) as local, h5py.File(local, "r") as f:
            layout, layers = read_layers(f)
    except WeightsFileError as e:
        raise WeightsFileError(f"--weights={path!r} {e}; it is not a Keras weights "
                               "file.") from None
    except OSError as e:
        raise WeightsFileError(f"--weights={path!r} could not be read as HDF5 "
                               f"({type(e).__name__}: {e}).") from None
    return WeightsFile(path, layout, layers)


def assign_backbone_weights(model, weights: WeightsFile, label: str) -> int:
    """Sets every weight of `model` (a keras.applications ResNet) from `weights`.

    Every layer of `model` with weights must be in the file under its name with the same
    weights and shapes. The file may have more layers only in the legacy layout and only
    after the backbone's last layer there (the classifier of a with-top file, skipped).
    Nothing is assigned unless every layer fits.

    Args:
        model: the backbone (keras.Model).
        weights: read_weights_file's result.
        label: what `model` is, for messages (e.g. "backbone 'resnet50'").

    Returns:
        The number of layers set.

    Raises:
        WeightsFileError: the message names the file, the layout and the first layer
            (in the backbone's order, then the file's) that does not fit.
    """
    path, layout, layers = weights.path, weights.layout, weights.layers
    saved = dict(layers)
    order = [name for name, _ in layers]
    own = [layer for layer in model.layers if layer.weights]
    assignments = []
    for layer in own:
        if layer.name not in saved:
            raise WeightsFileError(
                f"--weights={path!r} ({layout} layout, {len(layers)} layers with weights) "
                f"does not fit {label}: its first layer that does not match is "
                f"{layer.name!r}, which the file lacks. Is it a file of another "
                "architecture? Check the --backbone / --weights pair.")
        try:
            assignments.extend(_match(layer, saved[layer.name], label))
        except WeightsFileError as e:
            raise WeightsFileError(
                f"--weights={path!r} ({layout} layout) does not fit {label}: its first "
                f"layer that does not match is {layer.name!r}: {e}. Check the --backbone / "
                "--weights pair.") from None
    names = {layer.name for layer in own}
    last = max(order.index(layer.name) for layer in own) if own else -1
    extra = [name for i, name in enumerate(order)
             if name not in names and (layout != "legacy" or i < last)]
    if extra:
        raise WeightsFileError(
            f"--weights={path!r} ({layout} layout) does not fit {label}: its first layer "
            f"that does not match is {extra[0]!r}, which the file has and the backbone "
            f"lacks ({len(extra)} such layers). Is it a file of a deeper architecture? "
            "Check the --backbone / --weights pair.")
    for variable, array in assignments:
        variable.assign(array)
    return len(own)
