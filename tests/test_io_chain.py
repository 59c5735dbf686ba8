"""The whole chain on TensorFlow's in-memory file system equals the chain on a local disk.

In one process: generate the synthetic set -> convert it (Beam, in-memory runner) -> train 2
steps -> resume to 4 -> export -> evaluate the export, with every root under `ram://`; in a
second process the same chain under a local folder (a fresh process each, so both start
from the same random state: Keras keeps a process-wide seed generator). The shards' bytes,
the descriptors, the mAP and the export's outputs must be the same.
"""

import dataclasses
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from glam_tf import files
from glam_tf.config import DataConfig, ExportConfig, SyntheticConfig
from glam_tf.data import gldv2, synthetic
from glam_tf.eval import evaluator
from glam_tf.train import train
from helpers import TESTS_DIR
from keras_helpers import tiny_descriptor_model, tiny_train_config

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _tree(folder, root, skip=()):
    """{relative path: bytes} of every file under `folder`, the chain's root spelled <root>."""
    return {name: files.read_bytes(files.join(folder, name)).replace(root.encode(), b"<root>")
            for name in files.walk_files(folder) if files.basename(name) not in skip}


def _features(folder):
    """{relative path: array} of the descriptor shards, {relative path: dict} of their
    records and manifests (less the back-end fingerprint and the model path, also in a
    shard's `made_by`, which name where the model is)."""
    out = {}
    for name in files.walk_files(folder):
        path = files.join(folder, name)
        if name.endswith(".npy"):
            with files.open_file(path, "rb") as f:
                out[name] = np.load(f, allow_pickle=False)
        elif name.endswith(".json") and not name.endswith("items.json"):
            record = files.read_json(path)
            for part in (record, record.get("made_by", {})):
                part.pop("backend", None)
                part.get("settings", {}).get("model", {}).pop("path", None)
            out[name] = record
    return out


def _chain(root: str) -> dict:
    keras.utils.set_random_seed(0)
    synth = SyntheticConfig(root=files.join(root, "synth"), num_train_landmarks=3,
                            images_per_landmark=3, num_test_landmarks=2,
                            queries_per_landmark=2, num_distractor_landmarks=1, image_size=48)
    synthetic.generate_if_absent(synth, show_progress=False)
    shards_dir = files.join(root, "tfrecord")
    converted = gldv2.convert_gldv2(synth.root, shards_dir, num_shards=2, beam_args=IN_MEMORY)
    config = tiny_train_config(
        files.join(root, "run"), data_source="tfrecord", num_classes=0,
        data=DataConfig(file_pattern=converted.train_pattern, global_batch_size=4,
                        size_scale=0.1, shuffle_buffer=8),
        train_steps=2, checkpoint_every=2, summary_every=2)
    first = train(config, model_fn=tiny_descriptor_model)
    resumed = train(dataclasses.replace(
        config, train_steps=4, export=True,
        export_settings=ExportConfig(scales=(1.0,), max_image_size=48)),
        model_fn=tiny_descriptor_model)
    results = evaluator.run_evaluation(
        dataset="synth", data_root=synth.root, output_dir=files.join(root, "eval"),
        model=resumed.export_dir, max_image_size=48, shard_size=4, batch_size=4,
        beam_args=IN_MEMORY, print_table=False)
    image = tf.cast(tf.random.stateless_uniform((40, 48, 3), (1, 2), 0, 255), tf.uint8)
    served = tf.saved_model.load(resumed.export_dir).signatures["global_descriptor"](
        input_image=image)["global_descriptor"].numpy()
    return {
        "steps": (first.start_step, first.final_step, resumed.start_step, resumed.final_step),
        "export_dir": files.relpath(resumed.export_dir, root),
        "shards": _tree(shards_dir, root, skip=(gldv2.PLAN_NAME,)),
        "features": _features(files.join(root, "eval", "features")),
        "metrics": results["metrics"],
        "served": served,
        "checkpoints": sorted(files.listdir(files.join(root, "run", "checkpoints"))),
    }


def _chain_in_a_process(root: str, result_path: str):
    driver = (f"import pickle, sys\nsys.path.insert(0, {TESTS_DIR!r})\n"
              "import test_io_chain\n"
              f"result = test_io_chain._chain({root!r})\n"
              f"open({result_path!r}, 'wb').write(pickle.dumps(result))\n")
    # Deterministic kernels: two processes otherwise sum floats in different orders.
    env = dict(os.environ, TF_DETERMINISTIC_OPS="1", TF_ENABLE_ONEDNN_OPTS="0")
    return subprocess.Popen([sys.executable, "-c", driver], cwd=os.path.dirname(TESTS_DIR),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def test_the_chain_on_ram_equals_the_chain_on_a_local_disk(tmp_path):
    runs = {name: (_chain_in_a_process(root, str(tmp_path / f"{name}.pkl")), name)
            for name, root in (("local", str(tmp_path / "local")), ("ram", "ram://chain"))}
    for proc, name in runs.values():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
    local, in_memory = (pickle.loads((tmp_path / f"{n}.pkl").read_bytes())
                        for n in ("local", "ram"))
    assert local["steps"] == in_memory["steps"] == (0, 2, 2, 4)
    assert local["export_dir"] == in_memory["export_dir"] == "run/export/1"
    assert sorted(local["shards"]) == sorted(in_memory["shards"])
    assert {"train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
            "summary.json", "label_map.csv"} <= set(local["shards"])
    assert local["shards"] == in_memory["shards"]
    npy = [n for n in local["features"] if n.endswith(".npy")]
    assert len(npy) >= 3 and sorted(local["features"]) == sorted(in_memory["features"])
    for name, value in local["features"].items():
        if name.endswith(".npy"):
            diff = float(np.max(np.abs(value - in_memory["features"][name])))
            assert diff == 0.0, (name, diff)
        else:
            assert value == in_memory["features"][name], name
    assert local["metrics"] == in_memory["metrics"]
    assert 0.0 <= local["metrics"]["medium"]["mAP"] <= 100.0
    np.testing.assert_array_equal(local["served"], in_memory["served"])
    assert local["checkpoints"] == in_memory["checkpoints"]
    assert not any(files.TEMPORARY_TAG in n for n in local["checkpoints"])
