"""--weights=<file>: keras.applications' downloaded .h5 layout (with and without top), a
backbone saved by this project (.weights.h5), and files of another architecture."""

import dataclasses

import h5py
import keras
import numpy as np
import pytest

from glam_tf import files
from glam_tf.config.model import ModelConfig
from glam_tf.model.backbone import BackboneWeightsError, build_backbone


def write_keras_applications_h5(model, path, *, top_classes=0):
    """`model`'s weights in the layout of the files keras.applications downloads (Keras 2's
    save_weights): root attributes layer_names / backend / keras_version, one group per
    layer with attribute weight_names ('<layer>/kernel:0', ...) naming its datasets. With
    top_classes, the classifier follows as in resnet50_weights_tf_dim_ordering_tf_kernels.h5
    (avg_pool without weights, then the dense 'probs')."""
    names = [layer.name for layer in model.layers]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array(
            [n.encode() for n in names + (["avg_pool", "probs"] if top_classes else [])])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            variables = layer.trainable_weights + layer.non_trainable_weights
            weight_names = [f"{layer.name}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
            for name, variable in zip(weight_names, variables):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(variable))
        if top_classes:
            f.create_group("avg_pool").attrs["weight_names"] = np.array([], dtype="S1")
            probs = f.create_group("probs")
            probs.attrs["weight_names"] = np.array([b"probs/kernel:0", b"probs/bias:0"])
            rng = np.random.default_rng(0)
            probs.create_dataset("probs/kernel:0", data=rng.normal(
                size=(2048, top_classes)).astype("float32"))
            probs.create_dataset("probs/bias:0", data=np.zeros(top_classes, "float32"))


def weights_of(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def assert_same_weights(a, b):
    wa, wb = weights_of(a), weights_of(b)
    assert len(wa) == len(wb) == 318  # ResNet50 to conv5: 53 convs x 2, 53 BNs x 4
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def source():
    keras.utils.set_random_seed(1)
    model = keras.applications.ResNet50(include_top=False, weights=None,
                                        input_shape=(None, None, 3))
    # Moving statistics differ from their init (0 / 1), so a swapped BN order shows.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.25, "float32"))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 2.0, "float32"))
    return model


def test_keras_applications_notop_file_through_the_weights_setting(source, tmp_path):
    path = str(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    write_keras_applications_h5(source, path)
    config = dataclasses.replace(ModelConfig(), backbone="resnet50", weights=path)
    config.validate()
    loaded = build_backbone(config.backbone, config.weights)
    assert_same_weights(loaded, source)
    # The file is the layout Keras itself reads (its positional legacy loader agrees).
    keras_loaded = keras.applications.ResNet50(include_top=False, weights=None,
                                               input_shape=(None, None, 3))
    keras_loaded.load_weights(path)
    assert_same_weights(keras_loaded, source)


def test_keras_applications_file_with_top_skips_the_classifier(source, tmp_path):
    path = str(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5")
    write_keras_applications_h5(source, path, top_classes=1000)
    # A non-local path (TensorFlow's in-memory file system) is read through a scratch copy.
    remote = "ram://weights/resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    files.copy(path, remote)
    try:
        assert_same_weights(build_backbone("resnet50", remote), source)
    finally:
        files.remove(remote)


def test_backbone_saved_by_this_project(source, tmp_path):
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    assert_same_weights(build_backbone("resnet50", path), source)


def test_file_of_a_deeper_architecture_names_the_file_and_first_layer(tmp_path):
    deeper = keras.applications.ResNet101(include_top=False, weights=None,
                                          input_shape=(None, None, 3))
    legacy = str(tmp_path / "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5")
    write_keras_applications_h5(deeper, legacy)
    with pytest.raises(BackboneWeightsError) as e:
        build_backbone("resnet50", legacy)
    assert str(e.value) == (
        f"--weights={legacy!r} (legacy layout) does not fit backbone 'resnet50' "
        "(keras.applications.ResNet50): its first layer that does not match is "
        "'conv4_block7_1_conv', which the file has and the backbone lacks (102 such "
        "layers). Is it a file of a deeper architecture? Check the --backbone / --weights "
        "pair.")
    saved = str(tmp_path / "resnet101.weights.h5")
    deeper.save_weights(saved)
    with pytest.raises(BackboneWeightsError, match=r"resnet101\.weights\.h5.*keras3 layout.*"
                       r"first layer that does not match is 'conv4_block7_1_bn'"):
        build_backbone("resnet50", saved)


def test_shallower_file_and_other_shapes_name_the_first_layer(source, tmp_path):
    path = str(tmp_path / "shallow_notop.h5")
    write_keras_applications_h5(source, path)
    with pytest.raises(BackboneWeightsError) as e:
        build_backbone("resnet101", path)
    assert "its first layer that does not match is 'conv4_block7_1_conv', which the file " \
           "lacks" in str(e.value) and repr(path) in str(e.value)
    with h5py.File(path, "r+") as f:
        del f["conv2_block2_2_conv"]["conv2_block2_2_conv/kernel:0"]
        f["conv2_block2_2_conv"].create_dataset("conv2_block2_2_conv/kernel:0",
                                                data=np.zeros((1, 1, 64, 64), "float32"))
    with pytest.raises(BackboneWeightsError) as e:
        build_backbone("resnet50", path)
    assert str(e.value) == (
        f"--weights={path!r} (legacy layout) does not fit backbone 'resnet50' "
        "(keras.applications.ResNet50): its first layer that does not match is "
        "'conv2_block2_2_conv': layer 'conv2_block2_2_conv' weight 'kernel' has shape "
        "(3, 3, 64, 64) in backbone 'resnet50' (keras.applications.ResNet50), (1, 1, 64, 64) "
        "in the file. Check the --backbone / --weights pair.")


def test_missing_and_non_hdf5_files(tmp_path):
    missing = str(tmp_path / "nowhere.h5")
    with pytest.raises(BackboneWeightsError, match="Backbone weights file not found: "
                       r"--weights='.*nowhere\.h5' \(backbone 'resnet50'\)"):
        build_backbone("resnet50", missing)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(BackboneWeightsError, match=r"notes\.h5' could not be read as HDF5"):
        build_backbone("resnet50", str(text))
