"""A weights file is read as data: links, external and virtual storage, non-float datasets,
oversized declarations and non-finite values are refused before (or instead of) being read,
each in one message naming the file and the layer or HDF5 object.

The files are crafted with h5py from a tiny model with the layer names of a ResNet
(`conv1_conv`, `conv1_bn`); the loader is the one `--weights=<file>` uses
(glam_tf.model.weights_file), so no ResNet is built here.
"""

import logging
import os
import time
import tracemalloc

import h5py
import keras
import numpy as np
import pytest

from glam_tf.model.backbone import BackboneWeightsError, build_backbone
from glam_tf.model.weights_file import (WeightsFileError, assign_backbone_weights,
                                        open_weights_file)

SECRET = b"SECRET-BYTES-OF-ANOTHER-FILE-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP"
BIAS = "conv1_conv/conv1_conv/bias:0"
KERNEL = "conv1_conv/conv1_conv/kernel:0"


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    return keras.Model(inputs, x, name="tiny")


@pytest.fixture(scope="module")
def source():
    keras.utils.set_random_seed(3)
    model = tiny_model()
    model.get_layer("conv1_bn").moving_variance.assign(np.full(4, 2.0, "float32"))
    return model


def write_legacy(model, path, *, classifier_shape=(4, 10)):
    """`model` in keras.applications' legacy layout, a classifier 'probs' after it."""
    layers = [layer for layer in model.layers if layer.weights]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in layers]
                                          + [b"probs"])
        for layer in layers:
            group = f.create_group(layer.name)
            variables = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for name, variable in zip(names, variables):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(variable))
        probs = f.create_group("probs")
        probs.attrs["weight_names"] = np.array([b"probs/kernel:0"])
        probs.create_dataset("probs/kernel:0", shape=classifier_shape, dtype="float32",
                             chunks=True, compression="gzip")


def load(path, model=None):
    model = model or tiny_model()
    with open_weights_file(str(path)) as saved:
        assign_backbone_weights(model, saved, "the tiny model")
    return model


def replace(path, name, **dataset):
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, **dataset)


@pytest.fixture
def good(source, tmp_path):
    path = tmp_path / "good.h5"
    write_legacy(source, path)
    return path


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


def test_good_file_loads_and_the_classifier_is_skipped(source, good):
    model = load(good)
    for a, b in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def refused(path, *fragments):
    """The message of loading `path`: names the file and every fragment."""
    with pytest.raises(WeightsFileError) as e:
        load(path)
    message = str(e.value)
    assert f"--weights={str(path)!r}" in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_external_storage_is_refused_without_reading_the_other_file(good, secret):
    replace(good, BIAS, shape=(4,), dtype="float32", external=[(str(secret), 0, 16)])
    message = refused(good, f"'/{BIAS}' stores its values in another file",
                      "refused before any tensor was read")
    assert "SECRET" not in message and str(secret) in message


def test_virtual_dataset_is_refused(good, secret, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(4, dtype="float32"))
    layout = h5py.VirtualLayout(shape=(4,), dtype="float32")
    layout[:] = h5py.VirtualSource(str(other), "x", shape=(4,))
    with h5py.File(good, "r+") as f:
        del f[BIAS]
        f.create_virtual_dataset(BIAS, layout)
    refused(good, f"'/{BIAS}' is a virtual dataset")


@pytest.mark.parametrize("link, fragment", [
    (h5py.ExternalLink("other.h5", "/x"), "is an external link (to 'other.h5':/x)"),
    (h5py.SoftLink("/conv1_bn/conv1_bn/beta:0"), "is a soft link (to '/conv1_bn/"),
    (h5py.SoftLink("/" + BIAS), f"is a soft link (to '/{BIAS}')"),  # a loop
], ids=["external", "soft", "soft-loop"])
def test_links_are_refused(good, link, fragment):
    with h5py.File(good, "r+") as f:
        del f[BIAS]
        f[BIAS] = link
    refused(good, f"'/{BIAS}' {fragment}")


def test_hard_link_cycle_is_refused(good):
    with h5py.File(good, "r+") as f:
        f["conv1_conv/again"] = f["conv1_conv"]
    refused(good, "'/conv1_conv/again' links back to an object already reached")


@pytest.mark.parametrize("data, fragment", [
    (np.array([b"a", b"b", b"c", b"d"], dtype=h5py.string_dtype()), "holds strings"),
    (np.arange(4, dtype="int8"), "holds int8 values, not floating point"),
], ids=["string", "int8"])
def test_non_float_datasets_are_refused(good, data, fragment):
    replace(good, BIAS, data=data)
    refused(good, f"'/{BIAS}' {fragment}")


def test_float64_is_cast_and_logged(source, good, caplog):
    bias = keras.ops.convert_to_numpy(source.get_layer("conv1_conv").bias).astype("float64")
    replace(good, BIAS, data=bias)
    with caplog.at_level(logging.WARNING):
        model = load(good)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(
        model.get_layer("conv1_conv").bias), bias.astype("float32"))
    assert "1 tensor(s) of 1 layer(s) held float64 values, cast to float32 (the first: " \
           "layer 'conv1_conv')" in caplog.text


@pytest.mark.parametrize("name, value, fragment", [
    (KERNEL, np.nan, "layer 'conv1_conv' weight 'kernel:0' holds 1 non-finite value(s)"),
    ("conv1_bn/conv1_bn/moving_variance:0", np.inf,
     "layer 'conv1_bn' weight 'moving_variance:0' holds 1 non-finite"),
], ids=["nan-kernel", "inf-variance"])
def test_non_finite_values_are_refused_naming_the_layer(good, name, value, fragment):
    with h5py.File(good, "r+") as f:
        data = f[name][()]
        data.flat[1] = value
        f[name][...] = data
    model = tiny_model()
    before = model.get_weights()
    with pytest.raises(WeightsFileError, match="non-finite") as e:
        load(good, model)
    assert fragment in str(e.value)
    for a, b in zip(model.get_weights(), before):  # nothing assigned
        np.testing.assert_array_equal(a, b)


def _refuse_within(path, seconds, megabytes):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(WeightsFileError) as e:
            load(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < seconds
    assert peak < megabytes << 20, peak
    return str(e.value)


def test_huge_declared_kernel_is_refused_before_it_is_read(good):
    # 2^31 float32 (8 GiB once read), chunked and compressed: a few kB on disk.
    replace(good, KERNEL, shape=(2 ** 31,), dtype="float32", chunks=(1 << 20,),
            compression="gzip")
    assert os.path.getsize(good) < 1 << 20
    message = _refuse_within(good, seconds=5, megabytes=50)
    assert "'conv1_conv' weight 'kernel' has shape (3, 3, 3, 4) in the tiny model, " \
           "(2147483648,) in the file" in message


def test_skipped_classifier_is_never_read(source, tmp_path):
    path = tmp_path / "with_top.h5"
    write_legacy(source, path, classifier_shape=(2 ** 31,))
    tracemalloc.start()
    try:
        model = load(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 50 << 20
    np.testing.assert_array_equal(model.get_weights()[0], source.get_weights()[0])


def test_missing_group_empty_and_truncated_files(good, tmp_path):
    with h5py.File(good, "r+") as f:
        del f["conv1_bn"]
    refused(good, "HDF5 object '/' lists layer 'conv1_bn', which the file lacks")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    refused(empty, "could not be read as HDF5")
    whole = tmp_path / "whole.h5"
    write_legacy(tiny_model(), whole)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(whole.read_bytes()[:os.path.getsize(whole) // 2])
    refused(truncated, "could not be read as HDF5", "truncated")


def test_keras3_file_with_a_soft_link(source, tmp_path):
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    names = []
    with h5py.File(path, "r") as f:
        f.visit(names.append)
    target = next(n for n in names if n.endswith("vars/1"))
    with h5py.File(path, "r+") as f:
        del f[target]
        f[target] = h5py.SoftLink("/" + target.replace("vars/1", "vars/0"))
    refused(path, f"'/{target}' is a soft link")


def test_directory_is_refused_before_the_backbone_is_built(tmp_path):
    with pytest.raises(BackboneWeightsError, match=r"--weights='.*' is a directory, not a "
                       "weights file"):
        build_backbone("resnet50", str(tmp_path))
