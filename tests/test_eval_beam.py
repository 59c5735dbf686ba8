"""Extraction as a Beam pipeline (glam_tf.eval.extract_beam, DirectRunner: the default
in-memory worker and 2 worker processes): the same descriptors (within float rounding),
undecodable images and mAP as the in-process extraction, on the synthetic split with a tiny
exported SavedModel; the local defaults and TensorFlow thread limits."""

import numpy as np
import pytest

from helpers import SCALES

from glam_tf.config import SyntheticConfig
from glam_tf.data import synthetic, testsets
from glam_tf.eval import evaluator, extract, models


@pytest.fixture(scope="module")
def synth_and_model(tmp_path_factory):
    from glam_tf.export import export_saved_model  # pylint: disable=import-outside-toplevel
    from keras_helpers import tiny_keras_model  # pylint: disable=import-outside-toplevel

    root = tmp_path_factory.mktemp("beam_eval")
    config = SyntheticConfig(root=str(root / "synth_root"), num_train_landmarks=2,
                             images_per_landmark=2, num_test_landmarks=3,
                             queries_per_landmark=2, num_distractor_landmarks=1,
                             image_size=64)
    synthetic.generate_if_absent(config, show_progress=False)
    ts = testsets.load_testset(config.root, "synth")
    with open(ts.image_path(ts.imlist[1]), "wb") as f:  # one undecodable database image
        f.write(b"not an image")
    export_saved_model(tiny_keras_model(), str(root / "glam"), version=1, scales=SCALES,
                       max_image_size=64)
    return config.root, str(root / "glam"), ts


def test_beam_extraction_equals_in_process(tmp_path, synth_and_model):
    data_root, model, ts = synth_and_model
    common = dict(dataset="synth", data_root=data_root, max_image_size=64, scales=SCALES,
                  shard_size=5, batch_size=4)
    backend = models.build_backend(model=model, scales=SCALES)
    local = evaluator.run_evaluation(backend=backend, output_dir=str(tmp_path / "local"),
                                     model=model, print_table=False, **common)
    for tag, beam_args in (("beam", None), ("beam2", ["--direct_num_workers=2"])):
        beam = evaluator.run_evaluation(output_dir=str(tmp_path / tag), model=model,
                                        print_table=False, beam_args=beam_args,
                                        **common)  # no backend: the pipeline
        assert beam["status"] == local["status"] == "complete"
        assert beam["metrics"] == local["metrics"]
        assert beam["counts"] == local["counts"]
        assert beam["counts"]["undecodable_database"] == 1
        assert [u["id"] for u in beam["undecodable"]] == [ts.imlist[1]]
        for split in ("synth-queries", "synth-database"):
            ids = ts.qimlist if split.endswith("queries") else ts.imlist
            a = extract.merge_shards(str(tmp_path / "local" / "features" / split), ids)
            b = extract.merge_shards(str(tmp_path / tag / "features" / split), ids)
            np.testing.assert_allclose(b.descriptors, a.descriptors, atol=1e-6)
            np.testing.assert_array_equal(b.valid, a.valid)
            assert b.undecodable == a.undecodable


def test_local_args_and_tf_threads(monkeypatch):
    from glam_tf import beam_options  # pylint: disable=import-outside-toplevel
    from glam_tf.eval import extract_beam  # pylint: disable=import-outside-toplevel

    monkeypatch.delenv(extract_beam.TF_THREADS_ENV, raising=False)
    assert extract_beam.local_args(None, num_images=10) == list(extract_beam.LOCAL_IN_MEMORY)
    many = extract_beam.LOCAL_PROCESSES_MIN_IMAGES
    assert extract_beam.local_args(None, num_images=many) == []  # beam_options' 2 processes
    assert extract_beam.local_args(["--direct_num_workers=4"], num_images=10) == [
        "--direct_num_workers=4"]
    threads = lambda args: extract_beam.local_tf_threads(  # noqa: E731
        beam_options.pipeline_options(extract_beam.local_args(args)), cores=8)
    assert threads(None) is None  # TensorFlow's own pools unless asked
    assert threads(["--direct_num_workers=4"]) is None
    monkeypatch.setenv(extract_beam.TF_THREADS_ENV, "auto")
    assert threads(None) is None  # in memory: one TensorFlow runtime, all cores
    assert threads(["--direct_num_workers=4"]) == 2
    assert threads(["--direct_num_workers=16"]) == 1
    assert threads(["--runner=FlinkRunner"]) is None
    monkeypatch.setenv(extract_beam.TF_THREADS_ENV, "3")
    assert threads(["--runner=FlinkRunner"]) == 3


def test_workers_build_the_model_with_the_inference_options(tmp_path, monkeypatch,
                                                             synth_and_model):
    """The pipeline's workers rebuild the back-end from a BackendSpec: it must carry the
    evaluation's inference options (regional GeM etc.), or a --train_dir evaluation with
    them would describe images without them."""
    from glam_tf.config import EvalConfig, ExportConfig  # pylint: disable=import-outside-toplevel

    data_root, model, _ = synth_and_model
    (tmp_path / "model_config.json").write_text("{}")   # a training directory's layout
    (tmp_path / "checkpoints").mkdir()
    seen = {}

    def fake_extract_splits(splits, backend, factory, **kwargs):
        seen["spec"] = factory.__self__
        raise RuntimeError("stop after the spec")

    monkeypatch.setattr(evaluator.extract_beam, "extract_splits", fake_extract_splits)
    saved_model_backend = models.build_backend(model=model, scales=SCALES)
    monkeypatch.setattr(evaluator.models, "build_backend", lambda **kw: saved_model_backend)
    config = EvalConfig(dataset="synth", data_root=data_root, output_dir=str(tmp_path / "o"),
                        train_dir=str(tmp_path), max_image_size=64, scales=SCALES,
                        inference=ExportConfig(regional_gem=True))
    with pytest.raises(RuntimeError, match="stop after the spec"):
        evaluator.Evaluator(config=config, backend_factory=None).evaluate()
    assert seen["spec"].inference == config.inference
    assert seen["spec"].train_dir == str(tmp_path) and seen["spec"].scales == SCALES


def test_search_index_scores_as_the_extracted_database(tmp_path, synth_and_model):
    """eval_main --search_index: the index built from the database shards of an evaluation
    (its undecodable image left out) ranks the queries as the shards do: the same mAP."""
    from glam_tf.config import IndexConfig  # pylint: disable=import-outside-toplevel
    from glam_tf import search_index as index  # pylint: disable=import-outside-toplevel

    data_root, model, ts = synth_and_model
    common = dict(dataset="synth", data_root=data_root, max_image_size=64, scales=SCALES,
                  model=model, print_table=False)
    backend = models.build_backend(model=model, scales=SCALES)
    shards = evaluator.run_evaluation(backend=backend, output_dir=str(tmp_path / "shards"),
                                      **common)
    loaded, info = index.load_export(model)
    index.build_index(str(tmp_path / "index"), IndexConfig(), loaded, info,
                      descriptors=[str(tmp_path / "shards" / "features" / "synth-database")])
    through = evaluator.run_evaluation(backend=backend, output_dir=str(tmp_path / "index_eval"),
                                       search_index=str(tmp_path / "index"), **common)
    assert through["metrics"] == shards["metrics"]
    # the undecodable image ranks last; only the queries are extracted (and enlarged)
    drop = lambda counts: {k: v for k, v in counts.items()  # noqa: E731
                           if k != "enlarged_to_model_minimum"}
    assert drop(through["counts"]) == drop(shards["counts"])
    assert through["counts"]["undecodable_database"] == 1
    assert through["settings"]["search"].startswith("exact, search index")
    assert not (tmp_path / "index_eval" / "features" / "synth-database").exists()
    for a, b in zip(through["per_query"], shards["per_query"]):
        assert [t[0] for t in a["top"]] == [t[0] for t in b["top"]]
        np.testing.assert_allclose([t[1] for t in a["top"]], [t[1] for t in b["top"]],
                                   atol=1e-6)
    small = IndexConfig(max_k=ts.num_database - 2)
    index.build_index(str(tmp_path / "small"), small, loaded, info,
                      descriptors=[str(tmp_path / "shards" / "features" / "synth-database")])
    with pytest.raises(ValueError, match=r"--search_index: .* more than its max_k=.*rebuild"):
        evaluator.run_evaluation(backend=backend, output_dir=str(tmp_path / "small_eval"),
                                 search_index=str(tmp_path / "small"), **common)
