"""The search-index SavedModel (glam_tf.search_index, build_index_main), loaded as TF Serving
loads it (tf.saved_model.load, the signatures).

- search_from_descriptors equals glam_tf.eval.search.exact_search on random unit
  descriptors scored in several chunks: ids and order identical, scores within 1e-6; ties
  (exact integer scores) broken the same way (lower index first);
- bfloat16 / float16 storage: recall@100 against float32 >= 0.99 (printed);
- refusals (k 0, k > N, a wrong width, NaN, no query) are one line each and the model then
  answers a normal request identically;
- DBA baked in, and alpha-QE and the SuperGlobal re-ranking in the graph, equal
  refine_and_search with them on;
- search_from_bytes equals describing the images with the export and searching those;
- build_index_main: versions from shards, growth by new shards without describing the old
  images again, removal by id; bad flags exit 2 with one line;
- TensorFlow's C loader (serving_check/, as TF Serving loads a SavedModel) replays the
  warm-up file (a request per signature), answers both search signatures as the
  Python-loaded model does, refuses k = 0 with the same line and then answers identically;
  two versions (the second grown from the first) named by a models.config answer REST
  bodies and gRPC requests of glam_tf.export.requests as in Python.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import build_index_main
from conftest import REPO_ROOT, SHARED_DATA
from glam_tf.config import IndexConfig, RefineConfig, SettingError
from glam_tf.eval import extract, models, refine, search
from glam_tf import search_index as index
from glam_tf.export import serving
from glam_tf.model import ModelConfig
from keras_helpers import tiny_descriptor_model
from serving_check import loader
from test_serving_check import binary  # noqa: F401  (the C loader check's fixture)

TOL = 1e-6
DIM = 16
NUM = 5000


def _unit(rng, rows, dim):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(num, prefix="img"):
    return [f"{prefix}{i:05d}" for i in range(num)]


def _saved(tmp_path_factory, database, config, name):
    """The index written and loaded back (the descriptor signature only)."""
    module = index.SearchIndexModule(database, config)
    path = index.save_index(module, tmp_path_factory.mktemp(name))
    return tf.saved_model.load(path)


def _search(loaded, queries, k):
    out = loaded.signatures["search_from_descriptors"](descriptors=tf.constant(queries),
                                                        k=tf.constant(k, tf.int32))
    return {key: value.numpy() for key, value in out.items()}


def _refusal(error: tf.errors.InvalidArgumentError) -> str:
    lines = [line for line in error.message.splitlines()
             if line.startswith("assertion failed:")]
    assert len(lines) == 1, error.message
    return lines[0]


@pytest.fixture(scope="module")
def random_index(tmp_path_factory):
    """(database, loaded index): NUM x DIM unit rows; a 1 MiB budget makes 300 queries score
    the database in 5 chunks of 1024 rows."""
    database = index.Database(_unit(np.random.default_rng(0), NUM, DIM), _ids(NUM))
    config = IndexConfig(memory_budget_mb=1, max_queries=512)
    assert index.chunk_rows(300, NUM, DIM, config) == index.MIN_CHUNK_ROWS
    return database, _saved(tmp_path_factory, database, config, "random")


# ---- equality with the evaluator's search ----------------------------------------------------
@pytest.mark.parametrize("num_queries,k", [(300, 100), (1, 1), (7, 1000)])
def test_search_equals_exact_search(random_index, num_queries, k):
    database, loaded = random_index
    queries = _unit(np.random.default_rng(num_queries), num_queries, DIM)
    got = _search(loaded, queries, k)
    expected = search.exact_search(queries, database.descriptors, k=k)
    assert got["indices"].dtype == np.int64 and got["scores"].dtype == np.float32
    np.testing.assert_array_equal(got["indices"], expected.topk_indices)
    np.testing.assert_array_equal(got["ids"].astype(str),
                                  np.asarray(database.ids)[expected.topk_indices])
    worst = float(np.abs(got["scores"] - expected.topk_scores).max())
    print(f"B={num_queries} k={k}: order identical, max |score - exact_search| = {worst:.2e}")
    assert worst <= TOL


def test_ties_go_to_the_lower_index_across_chunks(tmp_path_factory):
    """Integer descriptors: exact scores, many equal, duplicates in different chunks."""
    rng = np.random.default_rng(1)
    rows = rng.integers(-2, 3, (3000, 8)).astype(np.float32)
    rows[2500:2600] = rows[10:110]   # the same rows in the last chunk
    database = index.Database(rows, _ids(3000))
    loaded = _saved(tmp_path_factory, database, IndexConfig(memory_budget_mb=1,
                                                            max_queries=512), "ties")
    queries = rng.integers(-2, 3, (300, 8)).astype(np.float32)
    got = _search(loaded, queries, 200)
    expected = search.exact_search(queries, rows, k=200)
    assert np.any(np.diff(expected.topk_scores, axis=1) == 0)   # ties inside the top 200
    np.testing.assert_array_equal(got["indices"], expected.topk_indices)
    np.testing.assert_array_equal(got["scores"], expected.topk_scores)


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_reduced_precision_storage_recall(tmp_path_factory, storage):
    rng = np.random.default_rng(2)
    database = index.Database(_unit(rng, NUM, 512), _ids(NUM))
    loaded = _saved(tmp_path_factory, database, IndexConfig(storage=storage), storage)
    queries = _unit(rng, 50, 512)
    got = _search(loaded, queries, 100)
    exact = search.exact_search(queries, database.descriptors, k=100).topk_indices
    recall = search.recall_at_k(got["indices"], exact, 100)
    print(f"{storage} storage, {NUM} x 512 random unit rows: recall@100 vs float32 = "
          f"{recall:.4f}")
    assert recall >= 0.99
    # float32 accumulation of the stored values: scores as NumPy computes them from those
    stored = database.descriptors.astype(tf.as_dtype(storage).as_numpy_dtype).astype(np.float32)
    np.testing.assert_allclose(got["scores"],
                               np.take_along_axis(queries @ stored.T, got["indices"], 1),
                               atol=TOL)


# ---- refusals ----------------------------------------------------------------------------------
def test_refusals_are_one_line_and_the_model_keeps_answering(random_index):
    database, loaded = random_index
    queries = _unit(np.random.default_rng(3), 4, DIM)
    before = _search(loaded, queries, 10)
    nan = queries.copy()
    nan[1, 3] = np.nan
    cases = [
        (queries, 0, "search_from_descriptors: k must be between 1 and 1000 (the index holds "
                     "5000 images; the index setting max_k is 1000); received k =] [0]"),
        (queries, NUM + 1, "k must be between 1 and 1000"),
        (queries[:, :7], 10, "search_from_descriptors: descriptors must have shape [B, 16] "
                             "(the index descriptor width); received shape] [4 7]"),
        (nan, 10, "search_from_descriptors: descriptors must be finite; received a NaN or "
                  "infinite value]"),
        (queries[:0], 10, "descriptors must hold between 1 and 512 rows (the index setting "
                          "max_queries); received] [0]"),
    ]
    for descriptors, k, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            _search(loaded, descriptors, k)
        line = _refusal(caught.value)
        print("refused:", line)
        assert message in line
    after = _search(loaded, queries, 10)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_small_index_limits_k_to_its_size(tmp_path_factory):
    database = index.Database(_unit(np.random.default_rng(4), 5, DIM), _ids(5))
    loaded = _saved(tmp_path_factory, database, IndexConfig(), "small")
    assert _search(loaded, database.descriptors, 5)["indices"][:, 0].tolist() == list(range(5))
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        _search(loaded, database.descriptors, 6)
    assert "k must be between 1 and 5 (the index holds 5 images" in _refusal(caught.value)


# ---- refinements -------------------------------------------------------------------------------
def test_database_augmentation_equals_refine_and_search(tmp_path_factory, random_index):
    database, _ = random_index
    config = IndexConfig(refine=RefineConfig(database_augmentation=True, dba_neighbors=3,
                                              dba_alpha=2.0))
    augmented = refine.database_augmentation(database.descriptors, k=3, alpha=2.0)
    loaded = _saved(tmp_path_factory, index.Database(augmented, database.ids), config, "dba")
    queries = _unit(np.random.default_rng(5), 20, DIM)
    expected, _ = refine.refine_and_search(
        queries, database.descriptors,
        RefineConfig(database_augmentation=True, dba_neighbors=3, dba_alpha=2.0), k=50)
    got = _search(loaded, queries, 50)
    np.testing.assert_array_equal(got["indices"], expected.topk_indices)
    assert np.abs(got["scores"] - expected.topk_scores).max() <= TOL


def test_query_expansion_equals_refine_and_search(tmp_path_factory, random_index):
    database, _ = random_index
    config = IndexConfig(refine=RefineConfig(query_expansion=True, qe_neighbors=3, qe_alpha=2.0))
    loaded = _saved(tmp_path_factory, database, config, "qe")
    queries = _unit(np.random.default_rng(7), 20, DIM)
    expected, _ = refine.refine_and_search(
        queries, database.descriptors,
        RefineConfig(query_expansion=True, qe_neighbors=3, qe_alpha=2.0), k=50)
    got = _search(loaded, queries, 50)
    np.testing.assert_array_equal(got["indices"], expected.topk_indices)
    worst = float(np.abs(got["scores"] - expected.topk_scores).max())
    print(f"alpha-QE in the graph: order identical, max |score difference| {worst:.2e}")
    assert worst <= TOL


def test_rerank_equals_refine_and_search(tmp_path_factory, random_index):
    """SuperGlobal re-ranking in the graph (after alpha-QE, as refine_and_search orders
    them): the same top-k as the NumPy re-ranking, scores within float rounding."""
    database, _ = random_index
    refinements = RefineConfig(rerank=True, rerank_m=60, rerank_k=4, rerank_beta=0.5,
                               query_expansion=True, qe_neighbors=2)
    config = IndexConfig(refine=refinements)
    loaded = _saved(tmp_path_factory, database, config, "rerank")
    queries = _unit(np.random.default_rng(11), 12, DIM)
    expected, _ = refine.refine_and_search(queries, database.descriptors, refinements, k=80)
    got = _search(loaded, queries, 80)
    np.testing.assert_array_equal(got["indices"], expected.topk_indices)
    assert np.abs(got["scores"] - expected.topk_scores).max() <= TOL
    assert not np.array_equal(expected.topk_indices[:, :60], expected.base.topk_indices[:, :60])


# ---- the image signature and the program -------------------------------------------------------
@pytest.fixture(scope="module")
def descriptor_export(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = tiny_descriptor_model(ModelConfig(weights="none", embedding_dim=32))
    base = tmp_path_factory.mktemp("export")
    serving.export_saved_model(model, base, max_image_size=96, scales=(0.70710678, 1.0),
                               warmup_requests=False)
    return base


@pytest.fixture(scope="module")
def photo_shards(descriptor_export, tmp_path_factory):
    """Two shard folders of the export's descriptors of the query crops (first 12, next 6)."""
    folder = SHARED_DATA / "oxford_query_crops"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    photos = sorted(folder.glob("*.jpg"))[:18]
    backend = models.load_saved_model(descriptor_export)
    out = tmp_path_factory.mktemp("shards")
    for name, part in (("first", photos[:12]), ("second", photos[12:])):
        items = [extract.ImageItem(p.name, str(p)) for p in part]
        extract.extract_split(items, str(out / name), backend, max_image_size=96,
                              batch_size=4, shard_size=5, name=name)
    return out / "first", out / "second", photos


def _build(argv):
    values = flags.FlagValues()
    build_index_main.define_flags(values)
    values(["build_index_main", *map(str, argv)])
    return build_index_main.run_build(values)


def test_program_versions_growth_and_removal(descriptor_export, photo_shards, tmp_path):
    first, second, photos = photo_shards
    index_dir = tmp_path / "index"
    v1 = _build([f"--export_dir={descriptor_export}", f"--descriptors={first}",
                 f"--index_dir={index_dir}"])
    assert v1.endswith("/1")
    removed = tmp_path / "remove.txt"
    removed.write_text("all_souls_1.jpg\nashmolean_2.jpg\n")
    v2 = _build([f"--export_dir={descriptor_export}", f"--index_dir={index_dir}",
                 "--base_version=1", f"--descriptors={second}", f"--remove_ids={removed}",
                 "--storage=bfloat16"])
    assert v2.endswith("/2")
    one, _ = index.read_index_database(v1)
    two, info = index.read_index_database(v2)
    assert one.ids == [p.name for p in photos[:12]]
    assert two.ids == [p.name for p in photos[:12] if p.name not in
                       ("all_souls_1.jpg", "ashmolean_2.jpg")] + [p.name for p in photos[12:]]
    assert info["base_version"] == 1 and info["storage"] == "bfloat16"
    # the kept rows are version 1's (bfloat16-rounded), not described again
    kept = [one.ids.index(i) for i in two.ids[:10]]
    np.testing.assert_array_equal(
        two.descriptors[:10],
        one.descriptors[kept].astype(tf.bfloat16.as_numpy_dtype).astype(np.float32))
    fresh = extract.merge_shards(str(second), [p.name for p in photos[12:]]).descriptors
    np.testing.assert_array_equal(
        two.descriptors[10:], fresh.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32))

    # search_from_bytes = the export's descriptors of the images, searched
    loaded = tf.saved_model.load(v1)
    data = tf.constant([p.read_bytes() for p in photos[:3]])
    got = loaded.signatures["search_from_bytes"](image_bytes=data, k=tf.constant(4))
    described = loaded.signatures["global_descriptor_from_bytes"](image_bytes=data)
    queries = described["global_descriptors"].numpy()
    via_descriptors = _search(loaded, queries, 4)
    expected = search.exact_search(queries, one.descriptors, k=4)
    np.testing.assert_array_equal(got["indices"].numpy(), expected.topk_indices)
    np.testing.assert_array_equal(got["ids"].numpy(), via_descriptors["ids"])
    assert np.abs(got["scores"].numpy() - expected.topk_scores).max() <= TOL
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        loaded.signatures["search_from_bytes"](image_bytes=tf.constant([b"not an image"]),
                                               k=tf.constant(4))
    assert "image_bytes[0]" in _refusal(caught.value)

    # growth refusals: an id already there; an unknown id to remove
    with pytest.raises(ValueError, match="is already in the index"):
        _build([f"--export_dir={descriptor_export}", f"--index_dir={index_dir}",
                "--base_version=1", f"--descriptors={first}"])
    removed.write_text("no_such_image.jpg\n")
    with pytest.raises(ValueError, match=r"--remove_ids: 1 ids are not in the index, e\.g\. "
                                         r"'no_such_image.jpg'"):
        _build([f"--export_dir={descriptor_export}", f"--index_dir={index_dir}",
                "--base_version=2", f"--remove_ids={removed}"])
    assert sorted(p.name for p in index_dir.iterdir()) == ["1", "2"]


def test_export_settings_are_refused_with_an_export(descriptor_export, photo_shards, tmp_path):
    with pytest.raises(SettingError, match=r"--max_image_size sets the descriptor model built "
                                           r"from --train_dir"):
        _build([f"--export_dir={descriptor_export}", f"--descriptors={photo_shards[0]}",
                f"--index_dir={tmp_path}", "--max_image_size=512"])


def test_program_bad_flags_exit_2_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "build_index_main.py", f"--index_dir={tmp_path}",
                          f"--export_dir={tmp_path / 'missing'}", "--descriptors=x"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("build_index_main: ")]
    assert lines == [f"build_index_main: error: --export_dir: model directory "
                     f"'{tmp_path / 'missing'}' does not exist"], res.stderr[-2000:]


def test_c_loader_answers_both_signatures_as_python(binary, descriptor_export,  # noqa: F811
                                                    photo_shards, tmp_path):
    first, _, photos = photo_shards
    model, info = index.load_export(descriptor_export)
    path = index.build_index(tmp_path / "index", IndexConfig(), model, info,
                             descriptors=[str(first)])
    loaded = tf.saved_model.load(path)
    queries = _unit(np.random.default_rng(6), 3, 32)
    data = [p.read_bytes() for p in photos[:2]]
    cases = [("search_from_descriptors", {"descriptors": queries, "k": np.int32(4)}),
             ("search_from_descriptors", {"descriptors": queries, "k": np.int32(0)}),
             ("search_from_bytes", {"image_bytes": data, "k": np.int32(5)}),
             ("search_from_descriptors", {"descriptors": queries, "k": np.int32(4)})]
    session = loader.run(binary, path, cases, warmup=True)
    assert session.warmup[0] == len(index.INDEX_SIGNATURES)   # one warm-up request each
    answers = session.answers
    assert [a.signature for a in answers] == [c[0] for c in cases]
    for (signature, inputs), answer in zip(cases, answers, strict=True):
        args = {name: tf.constant(value) for name, value in inputs.items()}
        try:
            expected = {k: v.numpy() for k, v in loaded.signatures[signature](**args).items()}
        except tf.errors.InvalidArgumentError as e:
            assert answer.error is not None and not answer.outputs
            line = _refusal(e)
            assert line in answer.error
            print("C loader refused:", line)
            continue
        assert answer.error is None, answer.error
        np.testing.assert_array_equal(answer.outputs["ids"], expected["ids"].astype(bytes))
        np.testing.assert_array_equal(answer.outputs["indices"], expected["indices"])
        worst = float(np.abs(answer.outputs["scores"] - expected["scores"]).max())
        print(f"{signature}: C loader ids/indices identical, max |score difference| "
              f"{worst:.2e}")
        assert worst <= TOL
    np.testing.assert_array_equal(answers[3].outputs["scores"], answers[0].outputs["scores"])


def test_program_from_a_training_directory(photo_shards, tmp_path, monkeypatch):
    """--train_dir: the index holds a serving module of the run's model (the checkpoint's
    restore stubbed with the tiny model: the wiring is under test, not the restore)."""
    from glam_tf.export import checkpoint  # pylint: disable=import-outside-toplevel

    first, _, photos = photo_shards
    keras.utils.set_random_seed(0)
    config = ModelConfig(weights="none", embedding_dim=32)
    model = tiny_descriptor_model(config)
    train_dir = tmp_path / "run"
    (train_dir / "checkpoints").mkdir(parents=True)
    (train_dir / "model_config.json").write_text(json.dumps(config.to_dict()))
    prefix = str(train_dir / "checkpoints" / "ckpt-7")
    monkeypatch.setattr(checkpoint, "restore_descriptor_model",
                        lambda directory: (model, config, prefix))
    path = _build([f"--train_dir={train_dir}", f"--descriptors={first}",
                   f"--index_dir={tmp_path / 'index'}", "--max_k=20",
                   "--max_image_size=96", "--scales=0.70710678,1.0"])
    info = json.loads((tmp_path / "index" / "1" / index.INDEX_INFO_FILE).read_text())
    assert info["export"]["checkpoint"] == prefix and info["max_k"] == 20
    assert info["export"]["max_image_size"] == 96
    loaded = tf.saved_model.load(path)
    data = tf.constant([photos[0].read_bytes()])
    module = serving.build_serving_module(model, max_image_size=96, scales=(0.70710678, 1.0))
    expected = module.global_descriptor_from_bytes(data)
    got = loaded.signatures["global_descriptor_from_bytes"](image_bytes=data)
    np.testing.assert_allclose(got["global_descriptors"], expected["global_descriptors"],
                               atol=TOL)
    answer = loaded.signatures["search_from_bytes"](image_bytes=data, k=tf.constant(12))
    assert sorted(answer["ids"].numpy()[0].astype(str)) == sorted(p.name for p in photos[:12])


def test_two_versions_served_from_a_models_config_through_rest_and_grpc(
        binary, descriptor_export, photo_shards, tmp_path):  # noqa: F811
    """A grown index is a second version beside the first: a models.config naming both
    parses with TF Serving's proto, and each version, sent REST bodies (through TF Serving's
    JSON rules) and gRPC requests made by glam_tf.export.requests, answers in the C loader
    as the Python-loaded version does; the second finds the images added to it."""
    from google.protobuf import text_format  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.config import (  # pylint: disable=import-outside-toplevel
        model_server_config_pb2)

    from glam_tf.export import requests  # pylint: disable=import-outside-toplevel
    from test_serving_check import _rest_to_tensors  # pylint: disable=import-outside-toplevel

    first, second, photos = photo_shards
    base = tmp_path / "index"
    v1 = _build([f"--export_dir={descriptor_export}", f"--descriptors={first}",
                 f"--index_dir={base}"])
    v2 = _build([f"--export_dir={descriptor_export}", f"--index_dir={base}",
                 "--base_version=1", f"--descriptors={second}"])
    config = text_format.Parse(f"""
        model_config_list {{ config {{
          name: "glam_index" base_path: "{base}" model_platform: "tensorflow"
          model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
        }} }}""", model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    versions = [base / str(v) for v in model.model_version_policy.specific.versions]
    assert [str(v) for v in versions] == [v1, v2]
    added = photos[12:14]
    cases = [("search_from_descriptors", {"descriptors": _unit(np.random.default_rng(3), 2, 32),
                                          "k": np.int32(3)}),
             ("search_from_bytes", {"image_bytes": [p.read_bytes() for p in added],
                                    "k": np.int32(2)})]
    for version in versions:
        defs = requests.signature_defs(version)
        logs = []
        for signature, inputs in cases:
            body = json.loads(json.dumps(requests.rest_body(defs, signature, inputs)))
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for name, value in _rest_to_tensors(body, defs[signature]).items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(
                    value, dtype=defs[signature].inputs[name].dtype))
            logs.append(request)
        logs += [requests.predict_request(defs, signature, inputs, model_name="glam_index")
                 for signature, inputs in cases]
        path = tmp_path / f"requests_{version.name}.tfrecord"
        requests.write_prediction_logs(path, logs)
        answers = loader.run(binary, str(version), prediction_logs=[path]).answers
        loaded = tf.saved_model.load(str(version))
        expected = [{k: v.numpy() for k, v in loaded.signatures[signature](
            **{n: tf.constant(x) for n, x in inputs.items()}).items()}
            for signature, inputs in cases]
        for answer, want in zip(answers, expected + expected, strict=True):
            assert answer.error is None, answer.error
            np.testing.assert_array_equal(answer.outputs["ids"], want["ids"].astype(bytes))
            np.testing.assert_array_equal(answer.outputs["indices"], want["indices"])
            assert np.abs(answer.outputs["scores"] - want["scores"]).max() <= TOL
        found = [i.decode() for i in expected[1]["ids"][:, 0]]
        if version.name == "2":   # the added photos find themselves first
            assert found == [p.name for p in added]
        else:
            assert not set(found) & {p.name for p in added}
