"""TF Serving requests for an export, made from its SignatureDefs: REST bodies, gRPC protos.

What a client sends is fixed by the export's SignatureDefs (input names, dtypes, ranks), read
here from `saved_model.pb` as TF Serving reads them (the MetaGraphDef tagged "serve"), so the
bodies follow the export rather than a copy of its interface:

- rest_body(..., form="inputs"): the columnar body {"signature_name", "inputs": {name:
  value}}, each input as sent (no batch dimension added): the form for the [H, W, C] inputs.
- rest_body(..., form="instances"): the row body {"signature_name", "instances": [...]}: one
  instance per element of the inputs' first dimension (a bare value when the signature has
  one input, else {name: value}); TF Serving stacks them back along that dimension.
- DT_STRING inputs are sent as {"b64": base64} (TF Serving decodes b64 only into strings).
- predict_request: the gRPC tensorflow.serving.PredictRequest (tensors typed by the
  SignatureDef); prediction_log: the same wrapped in a PredictionLog (the record format of
  TF Serving's warm-up file and request logs).
"""

from __future__ import annotations

import base64
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from glam_tf import files

SERVE_TAG = "serve"
REST_FORMS = ("inputs", "instances")


def signature_defs(export_path) -> dict:
    """name -> SignatureDef of the export's MetaGraphDef tagged "serve" (as TF Serving loads)."""
    path = files.join(export_path, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel.FromString(files.read_bytes(path))
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{path} has no MetaGraphDef tagged {SERVE_TAG!r}")


def _typed_inputs(defs: dict, signature: str, inputs: dict) -> dict:
    """inputs as arrays of the SignatureDef's dtypes; names and ranks checked."""
    if signature not in defs:
        raise ValueError(f"signature {signature!r} is not in the export; it has "
                         f"{', '.join(sorted(defs))}")
    wanted = defs[signature].inputs
    if set(inputs) != set(wanted):
        raise ValueError(f"signature {signature!r} takes inputs {sorted(wanted)}; received "
                         f"{sorted(inputs)}")
    typed = {}
    for name, info in wanted.items():
        dtype = tf.dtypes.as_dtype(info.dtype)
        value = np.asarray(inputs[name], dtype=object if dtype == tf.string
                           else dtype.as_numpy_dtype)
        rank = len(info.tensor_shape.dim)
        if not info.tensor_shape.unknown_rank and value.ndim != rank:
            raise ValueError(f"{signature} input {name!r} must have rank {rank}; received "
                             f"shape {value.shape}")
        typed[name] = value
    return typed


def _json_value(value):
    """A typed array (or one element of it) as JSON: nested lists, each string as {"b64": ...}."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if value.dtype == object:
        return _json_value(value.item()) if value.ndim == 0 else [_json_value(v) for v in value]
    return value.tolist()


def rest_body(defs: dict, signature: str, inputs: dict, form: str = "inputs") -> dict:
    """The REST predict body (JSON-able dict) asking `signature` for `inputs`.

    Args:
        defs: signature_defs(export).
        inputs: input name -> value (nested lists or arrays; a list of bytes for strings).
        form: "inputs" (columnar, each input as is) or "instances" (row: one instance per
            element of the first dimension, which every input must share).

    Raises:
        ValueError: an unknown signature or form, other input names, a wrong rank, inputs
            whose first dimensions differ in the row form.
    """
    if form not in REST_FORMS:
        raise ValueError(f"form must be one of {', '.join(REST_FORMS)}; received {form!r}")
    typed = _typed_inputs(defs, signature, inputs)
    if form == "inputs":
        return {"signature_name": signature,
                "inputs": {name: _json_value(v) for name, v in typed.items()}}
    if any(v.ndim == 0 for v in typed.values()) or len({len(v) for v in typed.values()}) != 1:
        raise ValueError(f"the row form needs every input of {signature!r} to share its first "
                         f"dimension; received shapes "
                         f"{ {name: v.shape for name, v in typed.items()} }")
    count = len(next(iter(typed.values())))
    if len(typed) == 1:
        (value,) = typed.values()
        instances = [_json_value(value[i]) for i in range(count)]
    else:
        instances = [{name: _json_value(v[i]) for name, v in typed.items()} for i in range(count)]
    return {"signature_name": signature, "instances": instances}


def predict_request(defs: dict, signature: str, inputs: dict,
                    model_name: str = "") -> predict_pb2.PredictRequest:
    """The gRPC PredictRequest asking `signature` (of model `model_name`) for `inputs`."""
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    if model_name:
        request.model_spec.name = model_name
    for name, value in _typed_inputs(defs, signature, inputs).items():
        dtype = tf.dtypes.as_dtype(defs[signature].inputs[name].dtype)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return request


def prediction_log(request: predict_pb2.PredictRequest) -> prediction_log_pb2.PredictionLog:
    """`request` as a PredictionLog (one record of a warm-up file)."""
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


def write_prediction_logs(path, requests) -> None:
    """Writes the PredictRequests as a TFRecord of PredictionLogs (TF Serving's warm-up format)."""
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for request in requests:
            writer.write(prediction_log(request).SerializeToString())
