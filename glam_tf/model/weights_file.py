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

A weights file is data from anywhere, so it is read as data, never as instructions:
before any tensor is read, the whole file is walked without following a link
(`check_structure`) and refused if it holds a soft or external link, a dataset stored in
another file (external storage) or mapped from one (a virtual dataset), or a dataset that
is not floating point. A tensor is read only once its declared shape equals its layer's
weight (layers the backbone lacks, such as a classifier, are never read); a non-finite
value is refused naming the layer; float16/float64 values are cast to float32 and logged.

Keras' own `load_weights` matches legacy files by position (a with-top file fails on its
layer count) and Keras 3 files by position within class, with messages that name neither
the file nor the layer, and follows every link the file holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import h5py
import numpy as np
from absl import logging

from glam_tf import files

# A ResNet152 file holds ~3,000 objects; a walk over more is refused rather than run long.
MAX_OBJECTS = 100_000
# Attributes read as names (layer_names, weight_names, name): at most this many entries.
MAX_NAMES = 100_000
_FLOAT_SIZES = (2, 4, 8)  # float16, float32, float64: cast to the variables' float32


class WeightsFileError(ValueError):
    """A weights file that does not fit the backbone or is refused: names the file and
    the first layer (or HDF5 object) at fault."""


class _Refusal(Exception):
    """Raised inside the walk with (object path, problem); worded by the caller."""


def _decode(values) -> list:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _join(parent: str, name: bytes) -> str:
    return parent.rstrip("/") + "/" + name.decode("utf8", "backslashreplace")


def _check_dataset(where: str, dataset_id) -> None:
    plist = dataset_id.get_create_plist()
    if plist.get_external_count():
        raise _Refusal(where, "stores its values in another file (HDF5 external storage, "
                              f"first: {plist.get_external(0)[0].decode('utf8', 'replace')!r})")
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise _Refusal(where, "is a virtual dataset (its values are mapped from other "
                              "datasets or files)")
    dtype = h5py.Dataset(dataset_id).dtype
    if dtype.kind != "f" or dtype.itemsize not in _FLOAT_SIZES:
        what = "strings" if h5py.check_string_dtype(dtype) else f"{dtype} values"
        raise _Refusal(where, f"holds {what}, not floating point (float16, float32 or "
                              "float64)")


def check_structure(f) -> int:
    """Walks every link of the open h5py file `f` from its root, following none, and
    checks every dataset's storage and type; reads no dataset value. Returns the number
    of objects seen.

    Raises:
        _Refusal: (object path, problem) of the first soft, external or user-defined
            link, hard-link cycle, dataset with external storage, virtual dataset or
            dataset of a non-float type; or more than MAX_OBJECTS objects.
    """
    root = f.id if isinstance(f.id, h5py.h5g.GroupID) else f["/"].id
    seen = {(h5py.h5o.get_info(root).fileno, h5py.h5o.get_info(root).addr)}
    stack = [("/", root)]
    while stack:
        where, group = stack.pop()
        for name in list(group):
            path = _join(where, name)
            kind = group.links.get_info(name).type
            if kind == h5py.h5l.TYPE_SOFT:
                target = group.links.get_val(name).decode("utf8", "replace")
                raise _Refusal(path, f"is a soft link (to {target!r})")
            if kind == h5py.h5l.TYPE_EXTERNAL:
                filename, target = group.links.get_val(name)
                raise _Refusal(path, "is an external link (to "
                               f"{filename.decode('utf8', 'replace')!r}:"
                               f"{target.decode('utf8', 'replace')})")
            if kind != h5py.h5l.TYPE_HARD:
                raise _Refusal(path, f"is a link of user-defined type {kind}")
            child = h5py.h5o.open(group, name)
            info = h5py.h5o.get_info(child)
            if (info.fileno, info.addr) in seen:
                raise _Refusal(path, "links back to an object already reached (a hard-link "
                                     "cycle or shared object)")
            seen.add((info.fileno, info.addr))
            if len(seen) > MAX_OBJECTS:
                raise _Refusal(path, f"is past the {MAX_OBJECTS}th object of the file (a "
                                     "ResNet weights file holds a few thousand)")
            if info.type == h5py.h5o.TYPE_GROUP:
                stack.append((path, child))
            elif info.type == h5py.h5o.TYPE_DATASET:
                _check_dataset(path, child)
    return len(seen)


def _names(obj, attribute: str, *, required: bool) -> list:
    """The strings of attribute `attribute` of `obj`, its size checked before it is read."""
    if attribute not in obj.attrs:
        if required:
            raise _Refusal(obj.name, f"lacks attribute {attribute!r}")
        return []
    attr = obj.attrs.get_id(attribute)
    count = int(np.prod(attr.shape or ()))
    if count == 0:  # Keras writes a layer without weights as an empty float64 array
        return []
    if attr.dtype.kind not in "SUO" or count > MAX_NAMES:
        raise _Refusal(obj.name, f"has an attribute {attribute!r} of {count} {attr.dtype}, "
                                 f"not a list of at most {MAX_NAMES} names")
    values = obj.attrs[attribute]
    return _decode(np.atleast_1d(values).tolist())


def _member(group, name: str, kind, what: str):
    """group[name] as `kind` (h5py.Group or h5py.Dataset), refused when absent or not so."""
    if name not in group:
        raise _Refusal(group.name, f"lists {what} {name!r}, which the file lacks")
    obj = group[name]
    if not isinstance(obj, kind):
        raise _Refusal(obj.name, f"is not a{' group' if kind is h5py.Group else ' dataset'}")
    return obj


def _legacy_layers(group) -> list:
    """[(layer name, [(weight name, dataset), ...])] of a legacy group, in saved order."""
    layers = []
    for name in _names(group, "layer_names", required=True):
        layer = _member(group, name, h5py.Group, "layer")
        weight_names = _names(layer, "weight_names", required=False)
        if weight_names:
            layers.append((name, [(w, _member(layer, w, h5py.Dataset, "weight"))
                                  for w in weight_names]))
    return layers


def _keras3_layers(group) -> list:
    """[(layer name, [(index, dataset), ...])] of a Keras 3 weights file, nested models
    flattened; layers in the natural order of their keys."""
    layers = []
    for key in sorted(group, key=_natural_key):
        entry = _member(group, key, h5py.Group, "layer")
        if "vars" in entry:
            variables = _member(entry, "vars", h5py.Group, "group")
            if len(variables):
                names = _names(variables, "name", required=False)
                layers.append((names[0] if names else key,
                               [(i, _member(variables, i, h5py.Dataset, "weight"))
                                for i in sorted(variables, key=_natural_key)]))
        if "layers" in entry:
            layers.extend(_keras3_layers(_member(entry, "layers", h5py.Group, "group")))
    return layers


def read_layers(f) -> tuple:
    """(layout, [(layer name, [(weight name or index, h5py.Dataset)])]) of an open h5 file
    whose structure `check_structure` accepted; reads names, no tensor."""
    if "layer_names" in f.attrs:
        return "legacy", _legacy_layers(f)
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        return "legacy", _legacy_layers(f["model_weights"])
    if "layers" in f:
        return "keras3", _keras3_layers(_member(f, "layers", h5py.Group, "group"))
    raise WeightsFileError("holds neither Keras weights layout (no root attribute "
                           "'layer_names', no group 'model_weights' or 'layers')")


def _variable_name(weight_name) -> str:
    """'conv1_conv/kernel:0' -> 'kernel'; an index stays a str of itself."""
    return str(weight_name).rsplit("/", 1)[-1].split(":", 1)[0]


def _match(layer, saved: list, label: str) -> list:
    """[(variable, dataset)] of `layer` in the order of its variables, the declared shapes
    checked (nothing read); raises on a mismatch."""
    variables = layer.trainable_weights + layer.non_trainable_weights
    names = [v.name for v in variables]
    by_name = {_variable_name(w): d for w, d in saved}
    if len(saved) != len(variables):
        raise WeightsFileError(
            f"layer {layer.name!r} has {len(variables)} weights ({', '.join(names)}), the "
            f"file {len(saved)} ({', '.join(str(w) for w, _ in saved)})")
    datasets = ([by_name[n] for n in names] if set(by_name) == set(names)
                else [d for _, d in saved])
    for variable, dataset in zip(variables, datasets):
        if tuple(variable.shape) != tuple(dataset.shape):
            raise WeightsFileError(
                f"layer {layer.name!r} weight {variable.name!r} has shape "
                f"{tuple(variable.shape)} in {label}, {tuple(dataset.shape)} in the file")
    return list(zip(variables, datasets))


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """An open weights file whose structure is checked: `layers` is
    [(layer name, [(weight name or index, h5py.Dataset), ...])] in the file's order; no
    tensor is read until `assign_backbone_weights`."""

    path: str
    layout: str
    layers: list


@contextlib.contextmanager
def open_weights_file(path: str):
    """Opens `path` (local or tf.io.gfile) and checks its structure before any model is
    built: a file that is not a Keras weights file, or holds links, external or virtual
    storage or non-float datasets, fails first. Yields a WeightsFile, valid in the block.

    Raises:
        WeightsFileError: the message names the file and the object at fault.
    """
    prefix = f"--weights={path!r}"
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(files.local_copy(path))
            f = stack.enter_context(h5py.File(local, "r"))
            check_structure(f)
            layout, layers = read_layers(f)
        except _Refusal as e:
            where, problem = e.args
            raise WeightsFileError(
                f"{prefix}: HDF5 object {where!r} {problem}; refused before any tensor was "
                "read (a weights file must hold its own float tensors, without links)"
            ) from None
        except WeightsFileError as e:
            raise WeightsFileError(f"{prefix} {e}; it is not a Keras weights file.") from None
        except (OSError, KeyError, RuntimeError) as e:
            raise WeightsFileError(
                f"{prefix} could not be read as HDF5 ({type(e).__name__}: "
                f"{' '.join(str(e).split())}); is it complete (not truncated) and a Keras "
                "weights file?") from None
        yield WeightsFile(path, layout, layers)


def _read(path: str, layer_name: str, weight, dataset) -> np.ndarray:
    """The float32 values of `dataset`, whose shape was checked; non-finite refused."""
    try:
        values = dataset[()]
    except (OSError, RuntimeError, ValueError) as e:
        raise WeightsFileError(
            f"--weights={path!r}: layer {layer_name!r} weight {str(weight)!r} could not be "
            f"read ({type(e).__name__}: {' '.join(str(e).split())}); is the file complete "
            "(not truncated)?") from None
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if bad.any():
        raise WeightsFileError(
            f"--weights={path!r}: layer {layer_name!r} weight {str(weight)!r} holds "
            f"{int(bad.sum())} non-finite value(s) (NaN or inf) of {values.size}; refused. "
            "Use a file whose tensors are finite (a run that diverged saves such weights).")
    return values


def assign_backbone_weights(model, weights: WeightsFile, label: str) -> int:
    """Sets every weight of `model` (a keras.applications ResNet) from `weights`.

    Every layer of `model` with weights must be in the file under its name with the same
    weights and declared shapes. The file may have more layers only in the legacy layout
    and only after the backbone's last layer there (the classifier of a with-top file,
    skipped and never read). Every shape is checked before any tensor is read; nothing is
    assigned unless every tensor read is finite. Values that are not float32 are cast and
    the cast is logged.

    Args:
        model: the backbone (keras.Model).
        weights: open_weights_file's result, used inside its block.
        label: what `model` is, for messages (e.g. "backbone 'resnet50'").

    Returns:
        The number of layers set.

    Raises:
        WeightsFileError: the message names the file, the layout and the first layer
            (in the backbone's order, then the file's) that does not fit or holds a
            non-finite value.
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
            matched = _match(layer, saved[layer.name], label)
        except WeightsFileError as e:
            raise WeightsFileError(
                f"--weights={path!r} ({layout} layout) does not fit {label}: its first "
                f"layer that does not match is {layer.name!r}: {e}. Check the --backbone / "
                "--weights pair.") from None
        assignments.extend((layer.name, variable, dataset) for variable, dataset in matched)
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
    values, casts = [], {}
    for layer_name, variable, dataset in assignments:
        array = _read(path, layer_name, dataset.name.rsplit("/", 1)[-1], dataset)
        if array.dtype != np.dtype(variable.dtype):
            casts.setdefault((str(array.dtype), str(variable.dtype)), []).append(layer_name)
        values.append(array.astype(variable.dtype, copy=False))
    for (source, target), cast in casts.items():
        logging.warning("--weights=%r: %d tensor(s) of %d layer(s) held %s values, cast to "
                        "%s (the first: layer %r).", path, len(cast), len(set(cast)), source,
                        target, cast[0])
    for (_, variable, _), array in zip(assignments, values):
        variable.assign(array)
    return len(own)
