"""The export answered by TensorFlow's C loader (serving_check/), as TF Serving loads it.

serving_check (C, built here with the system compiler against the installed TensorFlow wheel)
loads the SavedModel with tag "serve", finds every signature's tensors in the MetaGraphDef's
SignatureDefs and runs them in one session. Its answers are compared with the Python-loaded
model's (tf.saved_model.load) on real photos for a float32 and a bfloat16 export of a tiny
GLAM model (tests/keras_helpers.tiny_descriptor_model); refusals must carry the same
message and leave the session serving; the warm-up file is replayed; the REST bodies and the
gRPC PredictRequest of glam_tf.export.requests, turned into tensors by TF Serving's JSON
rules (implemented here, independently of the module), give the same descriptors.
"""

import base64
import io
import json
import pathlib
import re
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from google.protobuf import text_format
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

import export_main
from conftest import REPO_ROOT, SHARED_DATA
from glam_tf.config import ExportConfig, TrainConfig, settings
from glam_tf.export import requests, serving, warmup
from glam_tf.model import ModelConfig
from helpers import huge_png
from keras_helpers import tiny_descriptor_model
from serving_check import loader

MAX_SIZE = 96
SCALES = (0.70710678, 1.0)
TOL = 1e-6
PHOTOS = ("all_souls_2.jpg", "all_souls_4.jpg", "ashmolean_3.jpg")
PRECISIONS = ("float32", "bfloat16")


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def binary():
    if loader.compiler() is None:
        pytest.skip("no C compiler found ($CC, gcc or cc): the C loader check cannot be built; "
                    "install gcc (.ci/run does)")
    return loader.build()


def _read_photos():
    """name -> JPEG bytes of PHOTOS, or None without ../shared/data."""
    folder = SHARED_DATA / "oxford_query_crops"
    if not folder.is_dir():
        return None
    return {name: (folder / name).read_bytes() for name in PHOTOS}


@pytest.fixture(scope="module")
def photos():
    found = _read_photos()
    if found is None:
        pytest.skip(f"{SHARED_DATA / 'oxford_query_crops'} not present")
    return found


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """precision -> export path; the bfloat16 one without the warm-up file (the flag off)."""
    keras.utils.set_random_seed(0)
    model = tiny_descriptor_model(ModelConfig(weights="none", embedding_dim=32))
    base = tmp_path_factory.mktemp("exports")
    return {precision: serving.export_saved_model(
        model, base / precision, max_image_size=MAX_SIZE, scales=SCALES, precision=precision,
        warmup_requests=precision == "float32") for precision in PRECISIONS}


def _decoded(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _photo_requests(photos):
    """(signature, inputs) for every signature on the photos."""
    images = [_decoded(data) for data in photos.values()]
    same_size = np.stack([tf.cast(tf.image.resize(im, (72, MAX_SIZE)), tf.uint8).numpy()
                          for im in images])
    out = []
    for image in images:
        # serving_default does not resize: the photo at the export's size (the global
        # attention's cost grows with the square of the pixels).
        small = np.asarray(Image.fromarray(image).reduce(
            max(1, round(max(image.shape[:2]) / MAX_SIZE))))
        out.append(("serving_default", {"input_image": small,
                                        "input_scales": np.float32(SCALES),
                                        "input_global_scales_ind": np.int32([1, 0])}))
        out.append(("global_descriptor", {"input_image": image}))
    out.append(("batched_global_descriptors", {"input_images": same_size}))
    out.append(("global_descriptor_from_bytes", {"image_bytes": list(photos.values())}))
    return out


def _python_answer(loaded, signature, inputs):
    """(outputs, None) or (None, the refusal) from the Python-loaded model."""
    args = {name: tf.constant(value) for name, value in inputs.items()}
    try:
        outputs = loaded.signatures[signature](**args)
    except tf.errors.InvalidArgumentError as e:
        return None, e.message
    return {key: value.numpy() for key, value in outputs.items()}, None


def _refusal(message):
    """The model's own words: the 'assertion failed: [...]' line (the node lines around it
    name the graph node and differ between the Python and C callers)."""
    found = re.search(r"^assertion failed: .*$", message, re.MULTILINE)
    assert found, message
    return found.group(0)


def _max_difference(answer, expected):
    assert answer.error is None, answer.error
    assert set(answer.outputs) == set(expected)
    worst = 0.0
    for key, value in expected.items():
        got = answer.outputs[key]
        assert got.dtype == np.float32 and got.shape == value.shape, (key, got.shape)
        assert np.isfinite(got).all()
        worst = max(worst, float(np.max(np.abs(got - value))))
    return worst


# ---- every signature, both precisions, and refusals: one C session per precision -----------
EXPECTED_REFUSALS = (
    "assertion failed: [global_descriptor_from_bytes: image_bytes[0] is a 16383 x 16383 PNG "
    "image (268402689 pixels), over the export setting max_decoded_pixels=134217728; downsize "
    "it before sending.]",
    "assertion failed: [input_global_scales_ind must select at least one scale (a descriptor "
    "per selected scale is returned; none selected gives no descriptor); received []]",
)


def _refusal_requests():
    """A normal request, the two hostile ones (EXPECTED_REFUSALS), the normal one again (on
    the export's warm-up image: these run without ../shared/data too)."""
    image = warmup.warmup_image(MAX_SIZE)
    normal = ("global_descriptor", {"input_image": image})
    return [normal,
            ("global_descriptor_from_bytes", {"image_bytes": [huge_png(16383, 16383)]}),
            ("serving_default", {"input_image": image, "input_scales": np.float32(SCALES),
                                 "input_global_scales_ind": np.zeros([0], np.int32)}),
            normal]


@pytest.fixture(scope="module")
def sessions(binary, exports):
    """precision -> (requests, serving_check's answers, the Python-loaded model): the refusal
    requests, then every signature on the photos (when present), all in one C session."""
    out, photos = {}, _read_photos()
    for precision in PRECISIONS:
        cases = _refusal_requests() + (_photo_requests(photos) if photos else [])
        out[precision] = (cases, loader.run(binary, exports[precision], cases).answers,
                          tf.saved_model.load(exports[precision]))
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_signature_matches_python(sessions, photos, precision):
    cases, answers, loaded = sessions[precision]
    cases, answers = cases[4:], answers[4:]
    assert [a.signature for a in answers] == [c[0] for c in cases]
    assert {c[0] for c in cases} == set(serving.SIGNATURE_NAMES)
    for (signature, inputs), answer in zip(cases, answers, strict=True):
        expected, error = _python_answer(loaded, signature, inputs)
        assert error is None, error
        difference = _max_difference(answer, expected)
        print(f"{precision} {signature}: max |C - Python| = {difference:.2e}")
        assert difference <= TOL, (signature, difference)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_refusals_match_python_and_the_session_keeps_serving(sessions, precision):
    cases, answers, loaded = sessions[precision]
    for (signature, inputs), answer, message in zip(cases[1:3], answers[1:3],
                                                    EXPECTED_REFUSALS, strict=True):
        assert answer.outputs == {} and answer.error is not None
        _, python_error = _python_answer(loaded, signature, inputs)
        assert python_error is not None
        assert _refusal(answer.error) == _refusal(python_error) == message
        print(f"{precision} {signature}: refused: {_refusal(answer.error)}")
    before, after = answers[0], answers[3]
    np.testing.assert_array_equal(after.outputs["global_descriptor"],
                                  before.outputs["global_descriptor"])
    expected, _ = _python_answer(loaded, *cases[3])
    assert _max_difference(after, expected) <= TOL


# ---- warm-up ----------------------------------------------------------------------------------
def _records(path):
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]


def test_warmup_file_has_one_request_per_signature_at_the_export_size(exports):
    path = pathlib.Path(exports["float32"]) / warmup.WARMUP_FILE
    logs = _records(path)
    names = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert sorted(names) == sorted(serving.SIGNATURE_NAMES)
    by_name = {log.predict_log.request.model_spec.signature_name: log.predict_log.request
               for log in logs}
    image = tf.make_ndarray(by_name["global_descriptor"].inputs["input_image"])
    assert image.shape == (72, MAX_SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(
        tf.make_ndarray(by_name["batched_global_descriptors"].inputs["input_images"]),
        image[None])
    np.testing.assert_array_equal(
        tf.make_ndarray(by_name["serving_default"].inputs["input_scales"]), np.float32(SCALES))
    jpeg = by_name["global_descriptor_from_bytes"].inputs["image_bytes"].string_val
    assert len(jpeg) == 1 and tf.io.decode_jpeg(jpeg[0]).shape == (72, MAX_SIZE, 3)
    # The flag off: no file.
    assert not (pathlib.Path(exports["bfloat16"]) / warmup.WARMUP_FILE).exists()
    info = json.loads((pathlib.Path(exports["bfloat16"]) / "assets.extra" /
                       "glam_export.json").read_text())
    assert info["warmup_requests"] is False


def test_warmup_inputs_stay_within_the_export_limits():
    image = warmup.warmup_inputs(ExportConfig(max_image_size=1024))["global_descriptor"][
        "input_image"]
    assert image.shape == (768, 1024, 3) and image.dtype == np.uint8 and image.std() > 20
    # 3:4 of 64 px at scale 0.5 would be 24 px: the image grows to 64 (32 px at 0.5).
    tight = ExportConfig(max_image_size=64, scales=(0.5, 1.0), max_decoded_pixels=4000)
    inputs = warmup.warmup_inputs(tight)
    assert inputs["global_descriptor"]["input_image"].shape == (64, 64, 3)
    # 64 x 64 = 4096 px is over max_decoded_pixels: no from_bytes request (it would fail,
    # and TF Serving does not load a version whose warm-up fails).
    assert set(inputs) == set(serving.SIGNATURE_NAMES) - {"global_descriptor_from_bytes"}
    assert "global_descriptor_from_bytes" in warmup.warmup_inputs(
        ExportConfig(max_image_size=64, scales=(0.5, 1.0)))


def test_export_main_and_train_main_turn_the_warmup_file_off(tmp_path):
    fv = flags.FlagValues()
    export_main.define_flags(fv)
    fv(["export_main", f"--train_dir={tmp_path}", f"--export_dir={tmp_path / 'e'}",
        "--nowarmup_requests"])
    assert export_main.parse_flags(fv)["config"].warmup_requests is False
    assert ExportConfig().warmup_requests is True
    train_fv = flags.FlagValues()
    settings.define_flags(TrainConfig, train_fv)
    train_fv(["train_main", "--noexport_warmup_requests"])
    assert settings.from_flags(TrainConfig, train_fv).export_settings.warmup_requests is False


def test_c_loader_replays_the_warmup_and_answers_it_as_python(binary, exports):
    path = pathlib.Path(exports["float32"]) / warmup.WARMUP_FILE
    session = loader.run(binary, exports["float32"], warmup=True, prediction_logs=[path])
    assert session.warmup[0] == len(serving.SIGNATURE_NAMES)
    loaded = tf.saved_model.load(exports["float32"])
    for log, answer in zip(_records(path), session.answers, strict=True):
        request = log.predict_log.request
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        expected, _ = _python_answer(loaded, request.model_spec.signature_name, inputs)
        assert _max_difference(answer, expected) <= TOL


# ---- request formats --------------------------------------------------------------------------
_INT_RANGES = {tf.uint8: (0, 255), tf.int32: (-2**31, 2**31 - 1), tf.int64: (-2**63, 2**63 - 1)}


def _json_to_array(value, dtype):
    """One JSON value -> array of `dtype` by TF Serving's rules (util/json_tensor.cc):
    nested lists give the shape (they must be rectangular); {"b64": s} is decoded into bytes,
    and only a DT_STRING tensor may hold it; a plain JSON string is a DT_STRING element; a
    number must fit the dtype (integers: integral and in range)."""
    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            assert set(v) == {"b64"} and dtype == tf.string, f"b64 only for DT_STRING: {v}"
            return base64.b64decode(v["b64"], validate=True)
        if dtype == tf.string:
            assert isinstance(v, str), f"a DT_STRING element must be a string: {v!r}"
            return v.encode()
        assert isinstance(v, (int, float)) and not isinstance(v, bool), v
        if dtype in _INT_RANGES:
            low, high = _INT_RANGES[dtype]
            assert float(v).is_integer() and low <= v <= high, f"{v} does not fit {dtype.name}"
        return v
    converted = convert(value)
    array = np.array(converted, dtype=object if dtype == tf.string else dtype.as_numpy_dtype)
    assert array.dtype != object or dtype == tf.string, "ragged lists are refused"
    return array


def _rest_to_tensors(body, signature_def):
    """A REST predict body -> {input name: array}, as TF Serving turns it into tensors:
    "inputs" (columnar): each named input as is, or a bare value when the signature has one
    input; "instances" (row): the instances stacked along a new first dimension, each a
    {name: value} object or, with one input, a bare value (a {"b64": ...} object is a value)."""
    inputs = signature_def.inputs
    dtypes = {name: tf.dtypes.as_dtype(info.dtype) for name, info in inputs.items()}
    (only,) = inputs if len(inputs) == 1 else (None,)
    assert ("inputs" in body) != ("instances" in body), "exactly one of inputs / instances"
    if "inputs" in body:
        columns = body["inputs"]
        if only and not (isinstance(columns, dict) and set(columns) == {only}):
            columns = {only: columns}
        return {name: _json_to_array(value, dtypes[name]) for name, value in columns.items()}
    instances = body["instances"]
    named = all(isinstance(i, dict) and set(i) != {"b64"} for i in instances)
    if not named:
        assert only, "bare instances need a one-input signature"
        instances = [{only: i} for i in instances]
    assert all(set(i) == set(inputs) for i in instances), "every instance names every input"
    return {name: np.stack([_json_to_array(i[name], dtypes[name]) for i in instances])
            for name in inputs}


def test_rest_body_hand_checked_cases(exports):
    defs = requests.signature_defs(exports["float32"])
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert requests.rest_body(defs, "global_descriptor", {"input_image": image}) == {
        "signature_name": "global_descriptor",
        "inputs": {"input_image": [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]}}
    assert requests.rest_body(defs, "global_descriptor_from_bytes",
                              {"image_bytes": [b"\xff\xd8ab", b"png"]}, form="instances") == {
        "signature_name": "global_descriptor_from_bytes",
        "instances": [{"b64": "/9hhYg=="}, {"b64": "cG5n"}]}
    body = requests.rest_body(defs, "batched_global_descriptors",
                              {"input_images": image[None].repeat(2, 0)}, form="instances")
    assert body["instances"] == [image.tolist(), image.tolist()]
    body = requests.rest_body(defs, "serving_default", {
        "input_image": image, "input_scales": [1.0], "input_global_scales_ind": [0]})
    assert body["inputs"]["input_scales"] == [1.0]
    assert body["inputs"]["input_global_scales_ind"] == [0]
    # The rules implemented here on TF Serving's own examples.
    sig = defs["global_descriptor_from_bytes"]
    np.testing.assert_array_equal(_rest_to_tensors({"instances": [{"b64": "aGk="}]}, sig)
                                  ["image_bytes"], np.array([b"hi"], object))
    np.testing.assert_array_equal(_rest_to_tensors({"inputs": [{"b64": "aGk="}, "yo"]}, sig)
                                  ["image_bytes"], np.array([b"hi", b"yo"], object))
    with pytest.raises(AssertionError, match="b64 only for DT_STRING"):
        _rest_to_tensors({"inputs": {"input_image": [[[{"b64": "AA=="}]]]}},
                         defs["global_descriptor"])
    with pytest.raises(AssertionError, match="does not fit uint8"):
        _rest_to_tensors({"inputs": {"input_image": [[[256, 0, 0]]]}}, defs["global_descriptor"])
    for bad, match in [((defs, "nope", {}), "not in the export"),
                       ((defs, "global_descriptor", {"image": image}), "takes inputs"),
                       ((defs, "global_descriptor", {"input_image": image[0]}), "rank 3")]:
        with pytest.raises(ValueError, match=match):
            requests.rest_body(*bad)
    with pytest.raises(ValueError, match="share its first dimension"):
        requests.rest_body(defs, "serving_default", {
            "input_image": image, "input_scales": [1.0], "input_global_scales_ind": [0]},
            form="instances")


def test_rest_bodies_and_grpc_request_give_the_same_descriptors(binary, exports, photos,
                                                                  tmp_path):
    export = exports["float32"]
    defs = requests.signature_defs(export)
    cases = _photo_requests(photos)
    bodies = [(index, requests.rest_body(defs, signature, inputs, form))
              for index, (signature, inputs) in enumerate(cases)
              for form in ("inputs", "instances")
              if form == "inputs" or signature in ("batched_global_descriptors",
                                                   "global_descriptor_from_bytes")]
    # JSON over the wire, then TF Serving's rules; the tensors sent as PredictRequests.
    denoted = []
    for index, body in bodies:
        body = json.loads(json.dumps(body))
        signature = body["signature_name"]
        tensors = _rest_to_tensors(body, defs[signature])
        for name, value in tensors.items():
            np.testing.assert_array_equal(value, np.asarray(cases[index][1][name],
                                                            value.dtype))
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = signature
        for name, value in tensors.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(
                value, dtype=defs[signature].inputs[name].dtype))
        denoted.append(request)
    grpc = [requests.predict_request(defs, signature, inputs, model_name="glam")
            for signature, inputs in cases]
    path = tmp_path / "requests.tfrecord"
    requests.write_prediction_logs(path, denoted + grpc)
    session = loader.run(binary, export, prediction_logs=[path])
    loaded = tf.saved_model.load(export)
    python = [_python_answer(loaded, signature, inputs)[0] for signature, inputs in cases]
    rest_expected = [python[index] for index, _ in bodies]
    grpc_expected = python
    for answer, want in zip(session.answers, rest_expected + grpc_expected, strict=True):
        assert _max_difference(answer, want) <= TOL


def test_the_guides_models_config_parses_and_names_a_version_policy():
    readme = (REPO_ROOT / "docs" / "serving.md").read_text()
    block = re.search(r"```\n(model_config_list \{.*?)```", readme, re.DOTALL)
    assert block, "docs/serving.md has no models.config example"
    config = text_format.Parse(block.group(1), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("glam", "/models/glam",
                                                                   "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}
    assert "--model_config_file=/models/models.config" in readme


def test_bad_arguments_fail_before_loading_and_name_the_file(binary, exports, tmp_path):
    damaged = tmp_path / "damaged.tfrecord"
    requests.write_prediction_logs(damaged, [requests.predict_request(
        requests.signature_defs(exports["float32"]), "global_descriptor",
        {"input_image": np.zeros((40, 40, 3), np.uint8)})])
    data = bytearray(damaged.read_bytes())
    data[-20] ^= 1
    damaged.write_bytes(bytes(data))
    missing = tmp_path / "missing.npy"
    for kwargs, message in [
            (dict(prediction_logs=[damaged]), f"{damaged}: TFRecord data checksum mismatch"),
            (dict(requests=[("global_descriptor", {"input_image": np.zeros(3, bool)})]),
             "unsupported .npy dtype")]:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            loader.run(binary, exports["float32"], **kwargs)
    proc = subprocess.run(
        [str(binary), exports["float32"], str(tmp_path), "--run", "global_descriptor",
         f"input_image={missing}"], capture_output=True, text=True)
    assert proc.returncode == 1 and f"cannot read {missing}" in proc.stderr
    assert "load" not in proc.stdout
