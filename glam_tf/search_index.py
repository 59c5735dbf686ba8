"""A search endpoint as a SavedModel: the database inside, image in, matching image ids out.

`SearchIndexModule` holds the database descriptors (N, D) in a non-trainable tf.Variable
(float32, or bfloat16 / float16 storage: half the memory; products accumulated in float32),
the image ids (N,) in a string variable, and the descriptor model of an export, so TF
Serving loads it unchanged (stock ops only; variables, not constants: no 2 GB protobuf limit).
Signatures:

- `search_from_descriptors`: descriptors float32 [B, D] (unit rows), k int32 [] ->
  ids string [B, k], indices int64 [B, k], scores float32 [B, k].
- `search_from_bytes`: image_bytes string [B] (as the export's global_descriptor_from_bytes,
  same decoding limits), k int32 [] -> the same outputs.
- `global_descriptor_from_bytes`: the export's signature, unchanged.

The search is exact inner-product search, as glam_tf.eval.search.exact_search: the
database is scored chunk by chunk (a tf.while_loop) with a running top-k merged after each
chunk, best first, ties by database index (lower first: tf.math.top_k keeps the lower
position of equal values, and the running list precedes the chunk's higher indices).
Memory per request: the chunk's float32 scores, (rows, B) and their (B, rows) transpose
(plus the chunk's float32 copy with reduced-precision storage), fit `memory_budget_mb` (at
least 1024 rows), plus the top-k lists, (B, 2k) values and indices; nothing else is sized
by the database. The product is `chunk @ queries^T` (rows, B): with TensorFlow's CPU
kernels it is faster than `queries @ chunk^T` for few queries (bench/index_search.py).

Every request is checked before anything sized by it is allocated; a refusal is one line
(InvalidArgumentError "assertion failed: [...]") naming the input and the limit: descriptors
of rank 2 and width D, 1 <= B <= max_queries, finite values, 1 <= k <= min(N, max_k).

Optional at build time: alpha-DBA baked into the stored descriptors
(glam_tf.eval.refine.database_augmentation); in every request, alpha-QE (the queries
searched again after glam_tf.eval.refine.query_expansion, the outputs those of the
expanded queries) and the SuperGlobal re-ranking of the top M, as refine_and_search
returns them (config.refine, eval_main's RefineConfig). Each
version carries a TF Serving warm-up file (assets.extra/tf_serving_warmup_requests): one
request per signature.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from glam_tf import files
from glam_tf.config import IndexConfig, contract
from glam_tf.data.progress import ProgressBar

INDEX_SIGNATURES = ("search_from_descriptors", "search_from_bytes",
                    "global_descriptor_from_bytes")
INDEX_INFO_FILE = contract.INDEX_INFO_FILE
SAVED_MODEL_MARKER = "saved_model.pb"
# Checkpoint keys of the index's variables (attribute names of SearchIndexModule).
DATABASE_KEY = "database/.ATTRIBUTES/VARIABLE_VALUE"
IDS_KEY = "ids/.ATTRIBUTES/VARIABLE_VALUE"
# Shortest chunk of database rows scored at a time (below it the product is inefficient).
MIN_CHUNK_ROWS = 1024


@dataclasses.dataclass
class Database:
    """Database descriptors and their ids, in index order."""

    descriptors: np.ndarray  # (N, D) float32
    ids: list  # N str, unique

    def __post_init__(self):
        if self.descriptors.ndim != 2 or self.descriptors.shape[0] != len(self.ids):
            raise ValueError(f"descriptors of shape {self.descriptors.shape} for "
                             f"{len(self.ids)} ids: expected ({len(self.ids)}, D)")


def check_database(database: Database, source: str) -> None:
    """Refuses (ValueError, one line naming `source`) an empty database, duplicate ids,
    non-finite descriptors."""
    if not database.ids:
        raise ValueError(f"{source}: the database is empty (no valid image)")
    seen = set()
    for image_id in database.ids:
        if image_id in seen:
            raise ValueError(f"{source}: image id {image_id!r} appears more than once; ids "
                             "must be unique")
        seen.add(image_id)
    bad = ~np.isfinite(database.descriptors).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: the descriptor of {database.ids[row]!r} (row {row}) is "
                         f"not finite ({int(bad.sum())} such rows)")


def read_descriptor_shards(folder) -> Database:
    """The valid images of a shard folder as the evaluator and the Beam extraction write it.

    The ids are the shards' records, in order; every shard is checked by
    glam_tf.eval.extract.merge_shards (checksums, model, row counts). Undecodable images are
    left out (logged): they have no descriptor.
    """
    from glam_tf.eval import extract  # noqa: PLC0415 (Pillow only when reading shards)

    manifest = extract.read_manifest(folder)
    ranges = extract.shard_ranges(manifest["num_items"], manifest["shard_size"])
    ids = []
    for s in range(len(ranges)):
        record_path = files.join(folder, f"shard-{s:05d}.json")
        if not files.isfile(record_path):
            break  # merge_shards names every missing shard
        ids.extend(json.loads(files.read_bytes(record_path)).get("ids", []))
    if len(ids) != manifest["num_items"]:
        ids = [f"{folder}#{i}" for i in range(manifest["num_items"])]  # refused below
    merged = extract.merge_shards(folder, ids)
    if not merged.valid.all():
        logging.warning("%s: %d undecodable images left out of the index", folder,
                        int((~merged.valid).sum()))
    keep = np.flatnonzero(merged.valid)
    return Database(np.ascontiguousarray(merged.descriptors[keep]), [ids[i] for i in keep])


def read_index_database(version_dir) -> tuple:
    """(Database as stored, the index's glam_index.json) of an index version, read from its
    variables (no graph loaded). Reduced-precision storage comes back as float32."""
    info = files.read_json(files.join(version_dir, INDEX_INFO_FILE))
    reader = tf.train.load_checkpoint(files.join(version_dir, "variables", "variables"))
    descriptors = np.asarray(reader.get_tensor(DATABASE_KEY)).astype(np.float32)
    ids = [i.decode() for i in reader.get_tensor(IDS_KEY).tolist()]
    return Database(descriptors, ids), info


def describe_images(descriptor_model, paths, *, batch_size: int) -> Database:
    """Describes image files (any tf.io.gfile path) with the export's
    global_descriptor_from_bytes, `batch_size` at a time; ids are the paths. An image the
    export refuses is left out (logged with the export's reason)."""
    fn = descriptor_model.global_descriptor_from_bytes
    rows, ids = [], []
    bar = ProgressBar(len(paths), unit="images", description="Describing the database")
    for a in range(0, len(paths), batch_size):
        batch = paths[a:a + batch_size]
        data = [files.read_bytes(p) for p in batch]
        try:
            rows.append(fn(tf.constant(data))["global_descriptors"].numpy())
            ids.extend(batch)
        except tf.errors.InvalidArgumentError:
            for path, one in zip(batch, data):  # again one by one: keep the others
                try:
                    rows.append(fn(tf.constant([one]))["global_descriptors"].numpy())
                    ids.append(path)
                except tf.errors.InvalidArgumentError as e:
                    logging.warning("%s left out: %s", path, _assertion(e.message))
        bar.update(a + len(batch))
    bar.close()
    dim = rows[0].shape[1] if rows else 0
    descriptors = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    return Database(descriptors.astype(np.float32), ids)


def _assertion(message: str) -> str:
    """The refusal's own words from an InvalidArgumentError message (its first line)."""
    for line in message.splitlines():
        if line.startswith("assertion failed:"):
            return line
    return message.splitlines()[0] if message else message


def grow(base: Database, additions: Database, remove_ids=()) -> Database:
    """`base` without `remove_ids`, then `additions` (in that order).

    Raises:
        ValueError: an id to remove is not in `base`, or an added id is already there.
    """
    remove = set(remove_ids)
    known = set(base.ids)
    unknown = sorted(remove - known)
    if unknown:
        raise ValueError(f"--remove_ids: {len(unknown)} ids are not in the index, e.g. "
                         f"{unknown[0]!r}")
    keep = [i for i, image_id in enumerate(base.ids) if image_id not in remove]
    kept_ids = {base.ids[i] for i in keep}
    for image_id in additions.ids:
        if image_id in kept_ids:
            raise ValueError(f"image id {image_id!r} of the new descriptors is already in "
                             "the index; remove it first (--remove_ids) to replace it")
    if additions.ids and base.descriptors.shape[1] != additions.descriptors.shape[1]:
        raise ValueError(f"the new descriptors have width {additions.descriptors.shape[1]}, "
                         f"the index {base.descriptors.shape[1]}")
    descriptors = np.concatenate([base.descriptors[keep], additions.descriptors]) \
        if additions.ids else base.descriptors[keep]
    return Database(np.ascontiguousarray(descriptors, dtype=np.float32),
                    [base.ids[i] for i in keep] + list(additions.ids))


def chunk_rows(num_queries, num_images, dim, config: IndexConfig):
    """Database rows scored at a time for B = num_queries (a Python int or a scalar tensor).

    The chunk's float32 scores, (rows, B) and their (B, rows) transpose, plus the chunk's
    float32 copy when stored in a reduced precision, fit config.memory_budget_mb; at least
    MIN_CHUNK_ROWS, at most N.
    """
    budget = config.memory_budget_mb << 20
    per_row = 4 * (2 * num_queries + (dim if config.storage != "float32" else 0))
    rows = budget // per_row
    if isinstance(rows, tf.Tensor):
        return tf.clip_by_value(rows, min(MIN_CHUNK_ROWS, num_images), num_images)
    return int(np.clip(rows, min(MIN_CHUNK_ROWS, num_images), num_images))


class SearchIndexModule(tf.Module):
    """The search signatures around a database and a descriptor model (module docstring).

    Args:
        database: the Database (float32 unit rows; stored in config.storage).
        config: IndexConfig (storage, request limits, memory budget).
        descriptor_model: an object with the export's `global_descriptor_from_bytes`
            tf.function (a loaded export, or a GlamServingModule), or None for an index
            without the image signatures.
        max_images_per_request: the export's limit (its glam_export.json), for the message
            of search_from_bytes.
    """

    def __init__(self, database: Database, config: Optional[IndexConfig] = None, *,
                 descriptor_model=None, max_images_per_request: Optional[int] = None,
                 name="glam_index"):
        super().__init__(name=name)
        config = config or IndexConfig()
        config.validate()
        self.config = config
        self.num_images, self.descriptor_dim = (int(s) for s in database.descriptors.shape)
        dtype = tf.as_dtype(config.storage)
        # The whole value at once: a sliced assign would put the variable in copy-on-read
        # mode (every read a full copy, as TF's sparse variable ops need).
        self.database = tf.Variable(
            np.asarray(database.descriptors).astype(dtype.as_numpy_dtype, copy=False),
            trainable=False, name="database")
        self.ids = tf.Variable(tf.constant(list(database.ids), tf.string), trainable=False,
                               name="ids")
        self.descriptor_model = descriptor_model
        self.max_images_per_request = max_images_per_request
        if descriptor_model is None:   # not traced by tf.saved_model.save either
            self.search_from_bytes = self.global_descriptor_from_bytes = None

    # ---- graph helpers -------------------------------------------------------------------
    def _checked_k(self, k, what):
        """k as a checked int32 scalar: one value, 1 <= k <= min(N, max_k)."""
        limit = min(self.num_images, self.config.max_k)
        one = tf.debugging.Assert(tf.equal(tf.size(k), 1), [
            f"{what}: k must be one integer; received shape", tf.shape(k)], summarize=8)
        with tf.control_dependencies([one]):
            k = tf.reshape(k, [])
        ok = tf.debugging.Assert((k >= 1) & (k <= limit), [
            f"{what}: k must be between 1 and {limit} (the index holds {self.num_images} "
            f"images; the index setting max_k is {self.config.max_k}); received k =", k])
        with tf.control_dependencies([ok]):
            return tf.identity(k)

    def _checked_descriptors(self, descriptors, what):
        """(B, D) float32 checked: rank 2, width D, 1 <= B <= max_queries, finite."""
        dim, limit = self.descriptor_dim, self.config.max_queries
        shape = tf.concat([tf.shape(descriptors), tf.zeros([2], tf.int32)], 0)
        shaped = tf.debugging.Assert(
            tf.equal(tf.rank(descriptors), 2) & tf.equal(shape[1], dim), [
                f"{what}: descriptors must have shape [B, {dim}] (the index descriptor "
                "width); received shape", tf.shape(descriptors)], summarize=8)
        with tf.control_dependencies([shaped]):
            count = tf.debugging.Assert((shape[0] >= 1) & (shape[0] <= limit), [
                f"{what}: descriptors must hold between 1 and {limit} rows (the index "
                "setting max_queries); received", shape[0]])
        with tf.control_dependencies([count]):
            finite = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(descriptors)), [
                f"{what}: descriptors must be finite; received a NaN or infinite value"])
        with tf.control_dependencies([finite]):
            return tf.reshape(descriptors, [-1, dim])

    def _search(self, queries, k):
        """Exact top-k of checked (B, D) float32 `queries`: (indices int64, scores) (B, k).

        Chunk by chunk (chunk_rows), merging each chunk's top-k into the running lists.
        """
        num, dim = self.num_images, self.descriptor_dim
        batch = tf.shape(queries)[0]
        rows = chunk_rows(batch, num, dim, self.config)
        num_chunks = (num + rows - 1) // rows
        database = self.database.read_value()
        reduced = self.config.storage != "float32"
        queries_t = tf.transpose(queries)

        def body(i, top_scores, top_indices):
            start = i * rows
            size = tf.minimum(rows, num - start)
            chunk = tf.slice(database, [start, 0], [size, dim])
            if reduced:
                chunk = tf.cast(chunk, tf.float32)
            scores = tf.transpose(tf.matmul(chunk, queries_t))
            best = tf.math.top_k(scores, tf.minimum(k, size))
            merged_scores = tf.concat([top_scores, best.values], 1)
            merged_indices = tf.concat(
                [top_indices, tf.cast(best.indices + start, tf.int64)], 1)
            keep = tf.math.top_k(merged_scores, tf.minimum(k, tf.shape(merged_scores)[1]))
            return (i + 1, keep.values,
                    tf.gather(merged_indices, keep.indices, batch_dims=1))

        _, scores, indices = tf.while_loop(
            lambda i, *_: i < num_chunks, body,
            (tf.constant(0), tf.zeros([batch, 0], tf.float32), tf.zeros([batch, 0], tf.int64)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]),
                              tf.TensorShape([None, None])),
            parallel_iterations=1)
        return indices, scores

    def _expanded(self, queries):
        """alpha-QE (glam_tf.eval.refine.query_expansion): (B, D) queries ->
        normalise(q + sum_i max(s_i, 0)^alpha d_i) over their top-n database neighbours."""
        n = min(self.config.refine.qe_neighbors, self.num_images)
        indices, scores = self._search(queries, tf.constant(n, tf.int32))
        # From the value read (GatherV2), not the variable (ResourceGather): a sparse
        # variable access would make every later read of it a full copy.
        neighbours = tf.cast(tf.gather(self.database.read_value(), indices), tf.float32)
        weights = tf.pow(tf.maximum(scores, 0.0), self.config.refine.qe_alpha)
        summed = queries + tf.einsum("bn,bnd->bd", weights, neighbours)
        norm = tf.norm(summed, axis=1, keepdims=True)
        return summed / tf.maximum(norm, 1e-12)

    def _reranked(self, queries, k):
        """SuperGlobal re-ranking (glam_tf.eval.refine.superglobal_rerank) of each query's
        top M = min(rerank_m, N): (indices, scores) (B, k), the first M re-ordered with
        their re-ranking scores, later positions as the exact search's.

        One query at a time (tf.map_fn): a query's temporaries are its (M, M) similarities
        and a few (M, D) descriptor sets, whatever B.
        """
        cfg = self.config.refine
        m = min(cfg.rerank_m, self.num_images)
        kk = min(cfg.rerank_k + 1, m)
        indices, scores = self._search(queries, tf.maximum(k, m))
        database = self.database.read_value()

        def one(args):
            query, top = args
            x = tf.cast(tf.gather(database, top), tf.float32)                  # (M, D)
            # (a) MDescAug: each of the M refined by its K best among the M (itself first)
            best = tf.math.top_k(tf.matmul(x, x, transpose_b=True), kk)        # ties: lower
            weights = tf.concat([tf.ones([m, 1]), best.values[:, 1:] * cfg.rerank_beta], 1)
            weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
            refined = tf.einsum("mj,mjd->md", weights, tf.gather(x, best.indices))
            score_a = tf.linalg.matvec(refined, query)
            pre = tf.argsort(score_a, direction="DESCENDING", stable=True)
            # (b) RerankwMDA: the maximum of the K+1 best refined descriptors
            refined_pre = tf.gather(refined, pre)
            expansion = tf.reduce_max(refined_pre[:kk], axis=0)
            final = (tf.gather(score_a, pre) + tf.linalg.matvec(refined_pre, expansion)) / 2.0
            post = tf.argsort(final, direction="DESCENDING", stable=True)
            return tf.gather(top, tf.gather(pre, post)), tf.gather(final, post)

        top_m, final = tf.map_fn(one, (queries, indices[:, :m]), parallel_iterations=1,
                                 fn_output_signature=(tf.int64, tf.float32))
        indices = tf.concat([top_m, indices[:, m:]], 1)[:, :k]
        scores = tf.concat([final, scores[:, m:]], 1)[:, :k]
        return indices, scores

    def _answer(self, queries, k):
        if self.config.refine.query_expansion:
            queries = self._expanded(queries)
        if self.config.refine.rerank:
            indices, scores = self._reranked(queries, k)
        else:
            indices, scores = self._search(queries, k)
        return {"ids": tf.gather(self.ids, indices), "indices": indices, "scores": scores}

    # ---- signatures ----------------------------------------------------------------------
    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None], tf.float32, name="descriptors"),
        tf.TensorSpec([], tf.int32, name="k")])
    def search_from_descriptors(self, descriptors, k):
        """(B, D) unit descriptors -> their k nearest database images, best first."""
        what = "search_from_descriptors"
        k = self._checked_k(k, what)
        return self._answer(self._checked_descriptors(descriptors, what), k)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name="image_bytes"),
        tf.TensorSpec([], tf.int32, name="k")])
    def search_from_bytes(self, image_bytes, k):
        """Encoded images -> their k nearest database images (the export's descriptors)."""
        what = "search_from_bytes"
        k = self._checked_k(k, what)
        some = tf.debugging.Assert(tf.size(image_bytes) >= 1, [
            f"{what}: image_bytes must hold at least one image (at most "
            f"{self.max_images_per_request}, the export setting max_images_per_request); "
            "received none"])
        with tf.control_dependencies([some]):
            image_bytes = tf.identity(image_bytes)
        descriptors = self.descriptor_model.global_descriptor_from_bytes(image_bytes)
        return self._answer(tf.ensure_shape(descriptors["global_descriptors"],
                                            [None, self.descriptor_dim]), k)

    @tf.function(autograph=False,
                 input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def global_descriptor_from_bytes(self, image_bytes):
        """The export's signature: encoded images -> (B, D) unit descriptors."""
        return self.descriptor_model.global_descriptor_from_bytes(image_bytes)

    def signatures(self) -> dict:
        """name -> tf.function for tf.saved_model.save (the image ones need the model)."""
        names = INDEX_SIGNATURES if self.descriptor_model is not None else INDEX_SIGNATURES[:1]
        return {name: getattr(self, name) for name in names}


def load_export(path):
    """(the loaded descriptor export, its glam_export.json) of a SavedModel folder or a model
    base path (its newest version)."""
    path = contract.resolve_saved_model_dir(path)
    info_path = files.join(path, contract.EXPORT_INFO_FILE)
    info = files.read_json(info_path) if files.isfile(info_path) else {}
    loaded = tf.saved_model.load(path)
    if not hasattr(loaded, "global_descriptor_from_bytes"):
        raise ValueError(f"{path}: not a GLAM descriptor export (no "
                         "global_descriptor_from_bytes signature)")
    info.setdefault("export_path", path)
    return loaded, info


def write_warmup_requests(path, module: SearchIndexModule, export_config=None) -> str:
    """Writes the TF Serving warm-up file of the index at `path`; returns its path.

    One request per signature (glam_tf.export.warmup): search_from_descriptors with the
    first stored descriptor; with a descriptor model and `export_config` (the export's
    ExportConfig), search_from_bytes and global_descriptor_from_bytes with the export's
    warm-up JPEG, when its limits accept it. k = min(10, N, max_k).
    """
    from glam_tf.export import requests, warmup  # noqa: PLC0415

    k = np.int32(min(10, module.num_images, module.config.max_k))
    first = tf.cast(module.database[:1], tf.float32).numpy()
    inputs = {"search_from_descriptors": {"descriptors": first, "k": k}}
    if module.descriptor_model is not None and export_config is not None:
        image = warmup.warmup_inputs(export_config).get("global_descriptor_from_bytes")
        if image is not None:
            inputs["search_from_bytes"] = {**image, "k": k}
            inputs["global_descriptor_from_bytes"] = image
    defs = requests.signature_defs(path)
    out = files.join(path, warmup.WARMUP_FILE)
    files.makedirs(files.dirname(out))
    requests.write_prediction_logs(out, [requests.predict_request(defs, name, inputs[name])
                                         for name in defs if name in inputs])
    return out


def export_config_of(export_info: dict):
    """The ExportConfig recorded in an export's glam_export.json (its fields only)."""
    from glam_tf.config import ExportConfig  # noqa: PLC0415

    names = {f.name for f in dataclasses.fields(ExportConfig)}
    settings = {k: v for k, v in export_info.items() if k in names}
    if "scales" in settings:
        settings["scales"] = tuple(settings["scales"])
    return ExportConfig(**settings)


def save_index(module: SearchIndexModule, index_dir, *, version=None,
               extra_info=None, export_config=None) -> str:
    """Writes `module` as `<index_dir>/<version>/` (TF Serving layout), published complete.

    Written to a temporary folder beside it first (files.publish_dir: one rename on a local
    disk, saved_model.pb copied last elsewhere), so TF Serving never sees half a version.
    `extra_info` is stored in assets.extra/glam_index.json with the index settings; the
    warm-up file (write_warmup_requests) uses `export_config`, the export's ExportConfig.

    Returns:
        The version folder path.
    """
    from glam_tf.export import serving  # noqa: PLC0415 (Keras only when saving)

    index_dir = os.fspath(index_dir)
    serving.remove_unfinished_versions(index_dir)
    version = contract.resolve_version(index_dir, version)
    final = files.join(index_dir, str(version))
    files.makedirs(index_dir)
    tmp = files.join(index_dir, f"{files.TEMPORARY_TAG}{version}-{uuid.uuid4().hex[:8]}")
    try:
        signatures = module.signatures()
        logging.info("Writing the index (%d images x %d, %s) with signatures %s to %s",
                     module.num_images, module.descriptor_dim, module.config.storage,
                     ", ".join(signatures), tmp)
        tf.saved_model.save(module, tmp, signatures=signatures)
        info = {"signatures": list(signatures), "num_images": module.num_images,
                "descriptor_dim": module.descriptor_dim, **module.config.info(),
                "tensorflow_version": tf.__version__, **(extra_info or {})}
        files.makedirs(files.join(tmp, "assets.extra"))
        files.write_json_atomic(files.join(tmp, INDEX_INFO_FILE), info)
        write_warmup_requests(tmp, module, export_config)
        files.publish_dir(tmp, final, last=(SAVED_MODEL_MARKER,))
    finally:
        if files.exists(tmp):
            files.rmtree(tmp)
    logging.info("Index version %s written to %s", version, final)
    return final


def descriptor_model_from_training(train_dir, export_config=None):
    """(GlamServingModule of a training run's latest checkpoint, its export info): the
    descriptor model an index built from a training directory holds, with `export_config`
    (an ExportConfig; default ExportConfig())."""
    from glam_tf.export import checkpoint, serving  # noqa: PLC0415 (Keras only here)

    model, model_config, prefix = checkpoint.restore_descriptor_model(train_dir)
    module = serving.build_serving_module(model, export_config)
    info = {"descriptor_dim": module.descriptor_dim, **module.config.info(),
            "model_config": model_config.to_dict(), "checkpoint": files.absolute(prefix)}
    return module, info


def _model_identity(info: dict) -> dict:
    """What makes descriptors comparable between two builds: the export's settings and
    model, not where it was read from."""
    return {k: v for k, v in info.items() if k not in ("export_path", "tensorflow_version")}


def read_id_list(path) -> list:
    """Non-empty stripped lines of a text file (ids or image paths)."""
    return [line.strip() for line in files.read_text(path).splitlines() if line.strip()]


def build_index(index_dir, config: IndexConfig, descriptor_model, export_info: dict, *,
                descriptors=(), images=(), base_version=None, remove_ids=(),
                version=None) -> str:
    """Builds and writes one index version; returns its folder.

    The database: version `base_version` of `index_dir` as stored (no image described
    again) without `remove_ids`, then the valid images of each shard folder of
    `descriptors`, then the image files `images` described by `descriptor_model`. With
    config.refine.database_augmentation, alpha-DBA (glam_tf.eval.refine) is applied to the result.

    Raises:
        ValueError (one line): a base version of another model or one already augmented,
            unknown ids to remove, duplicate ids, non-finite descriptors, an empty database,
            descriptors of another width than the model's.
    """
    dim = int(export_info["descriptor_dim"])
    parts = []
    if base_version is not None:
        base_dir = files.join(index_dir, str(base_version))
        base, base_info = read_index_database(base_dir)
        if base_info.get("refine", {}).get("database_augmentation"):
            raise ValueError(f"{base_dir} stores DBA-augmented descriptors; build the grown "
                             "index from the shards instead (augmenting again would compound)")
        if _model_identity(base_info.get("export", {})) != _model_identity(export_info):
            raise ValueError(f"{base_dir} was built with another descriptor model or export "
                             "settings than this one; its descriptors cannot be mixed")
    else:
        base = Database(np.zeros((0, dim), np.float32), [])
    for folder in descriptors:
        part = read_descriptor_shards(folder)
        if part.descriptors.shape[1] != dim:
            raise ValueError(f"{folder}: descriptors of width {part.descriptors.shape[1]}, "
                             f"the model's are {dim}")
        parts.append(part)
    if images:
        batch = int(export_info.get("max_images_per_request", 8))
        parts.append(describe_images(descriptor_model, list(images), batch_size=batch))
    additions = Database(
        np.concatenate([p.descriptors for p in parts]) if parts else
        np.zeros((0, dim), np.float32), [i for p in parts for i in p.ids])
    database = grow(base, additions, remove_ids)
    check_database(database, files.join(index_dir, "<new version>"))
    logging.info("Index database: %d images (%d kept from version %s, %d added, %d removed)",
                 len(database.ids), len(base.ids) - len(set(remove_ids)), base_version,
                 len(additions.ids), len(set(remove_ids)))
    if config.refine.database_augmentation:
        from glam_tf.eval import refine  # noqa: PLC0415

        database = Database(refine.database_augmentation(
            database.descriptors, k=config.refine.dba_neighbors, alpha=config.refine.dba_alpha),
            database.ids)
    module = SearchIndexModule(
        database, config, descriptor_model=descriptor_model,
        max_images_per_request=export_info.get("max_images_per_request"))
    return save_index(module, index_dir, version=version,
                      export_config=export_config_of(export_info), extra_info={
        "export": export_info, "base_version": base_version,
        "sources": {"descriptors": [str(d) for d in descriptors], "images": len(images),
                    "removed": len(set(remove_ids))}})
