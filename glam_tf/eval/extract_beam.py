"""Descriptor extraction as one Apache Beam pipeline (queries, database, distractors).

The driver checks each split's manifest (glam_tf.eval.extract), writes the split's item
list next to it (`items.json`) and plans the unfinished shards; the pipeline's elements are
(split folder, shard index). A `DoFn` loads the model once per worker in `setup()` (from a
picklable `backend_factory`, e.g. `BackendSpec`: Beam's own TensorFlow model handler loads
with Keras's `load_model`, which refuses a SavedModel under Keras 3) and describes each shard
exactly as the in-process path does (size buckets, decode threads, same shard files), so
`merge_shards` and the evaluate stage read them unchanged. Undecodable images are listed in
the shard JSON as before and counted with Beam counters (namespace `glam_extract`).

Without runner flags (`local_args`, glam_tf.beam_options) the runner is the local one:
with few images to describe (< LOCAL_PROCESSES_MIN_IMAGES) one in-memory worker, the
driver's process, which reuses its model (`BackendSpec.build` loads once per process) and
has no start-up; with more, 2 worker processes, each loading the model (TensorFlow's threads
per worker: `local_tf_threads`); `--direct_num_workers=N` chooses. On a cluster
`--stage=extract` with `--runner=...` replaces the manual `--num_shards/--shard_index` hosts
(which still work: a run does the shards s with s % num_shards == shard_index). The feature
folder must be one every worker can write.
"""

import concurrent.futures
import dataclasses
import json
import os
import time

import apache_beam as beam
from absl import logging

from glam_tf import beam_options, files
from glam_tf.eval import extract

ITEMS_FILE = "items.json"
COUNTERS = "glam_extract"


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to load the model: `build()` = models.build_backend(...)."""

    model: str = ""
    train_dir: str = ""
    scales: tuple = None
    max_image_size: int = extract.DEFAULT_MAX_IMAGE_SIZE
    inference: object = None   # the ExportConfig of a training directory's inference options

    def build(self):
        """The back-end, loaded once per process: the driver's model is the in-memory
        worker's (the local default), a worker process loads its own."""
        from glam_tf.eval import models  # pylint: disable=g-import-not-at-top

        if self not in _LOADED:
            _LOADED[self] = models.build_backend(
                model=self.model or None, train_dir=self.train_dir or None,
                scales=self.scales, max_image_size=self.max_image_size,
                inference=self.inference)
        return _LOADED[self]


_LOADED = {}  # BackendSpec -> back-end of this process (kept while the process lives)
TF_THREADS_ENV = "GLAM_BEAM_TF_THREADS"


def local_args(beam_args, num_images=None):
    """Beam flags of the extraction. Without --runner or any DirectRunner worker flag:
    fewer than LOCAL_PROCESSES_MIN_IMAGES images to describe, one in-memory DirectRunner
    worker (the driver's process and model, no start-up); more, the DirectRunner's 2 worker
    processes (glam_tf.beam_options.LOCAL_DEFAULTS), whose start-up the images repay. Else
    `beam_args` as given."""
    args = [str(a) for a in (beam_args or ())]
    keys = ("--runner", "--direct_num_workers", "--direct_running_mode")
    if any(a == k or a.startswith(k + "=") for a in args for k in keys):
        return args
    if num_images is not None and num_images >= LOCAL_PROCESSES_MIN_IMAGES:
        return args
    return args + list(LOCAL_IN_MEMORY)


# bench/extract.py, 240 images at 192 px on 2 shared cores: 2 worker processes describe
# 1.3-1.7x as fast as one process (one fills the cores while the other runs Python) but
# pay 20-25 s of start-up (2 processes importing TensorFlow and loading the model);
# break-even between 500 and 1000 images (two runs).
LOCAL_IN_MEMORY = ("--direct_num_workers=1", "--direct_running_mode=in_memory")
LOCAL_PROCESSES_MIN_IMAGES = 1000


def _write_items(out_dir, items):
    rows = [[it.id, it.path, list(it.box) if it.box is not None else None] for it in items]
    files.write_text_atomic(files.join(out_dir, ITEMS_FILE), json.dumps(rows))


def _read_items(out_dir):
    with files.open_file(files.join(out_dir, ITEMS_FILE)) as f:
        return [extract.ImageItem(i, p, None if b is None else tuple(b)) for i, p, b in json.load(f)]


class _ExtractShard(beam.DoFn):
    """Describes one shard (element: (split folder, shard, label)); the model loads once."""

    def __init__(self, backend_factory, *, max_image_size, batch_size, num_threads,
                 tf_threads=None):
        super().__init__()
        self._factory = backend_factory
        self._tf_threads = tf_threads
        self._max_image_size = max_image_size
        self._batch_size = batch_size
        self._num_threads = num_threads
        self._images = beam.metrics.Metrics.counter(COUNTERS, "images_described")
        self._undecodable = beam.metrics.Metrics.counter(COUNTERS, "images_undecodable")
        self._shards = beam.metrics.Metrics.counter(COUNTERS, "shards_written")
        self._load_ms = beam.metrics.Metrics.distribution(COUNTERS, "model_load_ms")
        self._shard_ms = beam.metrics.Metrics.distribution(COUNTERS, "shard_ms")

    def setup(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if self._tf_threads:
            _limit_tf_threads(self._tf_threads)
        t0 = time.time()
        self._backend = self._factory()
        # reported with the first bundle: metrics updated in setup() are not collected
        self._load_pending_ms = int(1000 * (time.time() - t0))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self._num_threads)
        self._items = {}

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown()

    def process(self, element):
        out_dir, s, name = element
        if self._load_pending_ms is not None:
            self._load_ms.update(self._load_pending_ms)
            self._load_pending_ms = None
        if out_dir not in self._items:
            manifest = extract.read_manifest(out_dir)
            items = _read_items(out_dir)
            self._items[out_dir] = (items, extract.shard_ranges(len(items),
                                                                manifest["shard_size"]))
        items, ranges = self._items[out_dir]
        t0 = time.time()
        record = extract._extract_shard(  # pylint: disable=protected-access
            items, ranges[s], s, out_dir, self._backend, pool=self._pool,
            max_image_size=self._max_image_size, batch_size=self._batch_size,
            on_images=lambda n: None, name=name)
        a, b = ranges[s]
        self._images.inc(b - a - len(record["undecodable"]))
        self._undecodable.inc(len(record["undecodable"]))
        self._shards.inc()
        self._shard_ms.update(int(1000 * (time.time() - t0)))
        yield out_dir, s


def _limit_tf_threads(n):
    """TensorFlow's intra- and inter-op pools of this process to `n` threads each.

    Effective only before TensorFlow's runtime starts in the process (its first op or
    device query): a DirectRunner worker process calls this in `setup()`, before the model
    loads. Otherwise TensorFlow keeps its pools and a warning says so.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError as e:
        logging.warning("TensorFlow thread pools not limited to %d (runtime already "
                        "started): %s", n, e)


def local_tf_threads(options, cores=None):
    """TensorFlow threads for each Beam worker process; None: TensorFlow's default (its
    pools sized to every core), the default.

    The environment variable GLAM_BEAM_TF_THREADS=k sets k; =auto sets max(1, cores // N)
    for the DirectRunner's N worker processes (None for other runners and in-process
    modes). Not the default: on 2 shared cores (bench/extract.py) 2 worker processes with
    1 TensorFlow thread each described images 3-4x slower than with TensorFlow's own pools.
    """
    from apache_beam.options.pipeline_options import DirectOptions  # pylint: disable=g-import-not-at-top

    value = os.environ.get(TF_THREADS_ENV, "").strip().lower()
    if value != "auto":
        return int(value) or None if value else None
    if not beam_options.is_direct(options):
        return None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return None
    cores = cores or len(os.sched_getaffinity(0))
    workers = direct.direct_num_workers or os.cpu_count()
    return max(1, cores // max(1, workers))


def extract_splits(jobs, backend, backend_factory, *, beam_args=None,
                   max_image_size=extract.DEFAULT_MAX_IMAGE_SIZE, batch_size=8,
                   shard_size=1000, num_shards=1, shard_index=0, num_workers=2,
                   settings=None):
    """Extracts several splits in one Beam pipeline; returns their `ExtractionStatus`es.

    Args:
        jobs: [(items, out_dir, name)] per split (list of ImageItem, shard folder, label).
        backend: the model in this process (fingerprint and minimum side for the manifests).
        backend_factory: picklable callable returning the same back-end in a worker
            (`BackendSpec(...).build`).
        beam_args: Beam flags; None = DirectRunner: one in-memory worker, or 2 worker
            processes from LOCAL_PROCESSES_MIN_IMAGES images to describe (`local_args`).
        max_image_size, batch_size, shard_size, num_shards, shard_index, settings: as
            `extract.extract_split`.
        num_workers: decoding threads per Beam worker.

    Returns:
        (statuses, counters): one `ExtractionStatus` per job; the run's Beam counters
        (images_described, images_undecodable, shards_written) and distributions
        ({count, sum, min, max}: model_load_ms per worker, shard_ms per shard).
    """
    plans, elements = [], []
    for items, out_dir, name in jobs:
        ranges, mine, done_before, todo = extract._prepare_split(  # pylint: disable=protected-access
            items, out_dir, backend, max_image_size=max_image_size, shard_size=shard_size,
            num_shards=num_shards, shard_index=shard_index, settings=settings)
        if todo:
            _write_items(out_dir, items)
        plans.append((items, out_dir, ranges, mine, done_before, todo))
        elements += [(out_dir, s, name) for s in todo]
    num_images = sum(ranges[s][1] - ranges[s][0]
                     for _, _, ranges, _, _, todo in plans for s in todo)
    paths = {"output_dir": jobs[0][1] if jobs else "",
             "data_root": jobs[0][0][0].path if jobs and jobs[0][0] else ""}
    options = beam_options.pipeline_options(local_args(beam_args, num_images=num_images),
                                            paths=paths)
    t0 = time.time()
    counters = {}
    if elements:
        with beam.Pipeline(runner=beam_options.local_runner(options), options=options) as p:
            _ = (p
                 | "Shards" >> beam.Create(elements)
                 | "Spread" >> beam.Reshuffle()
                 | "Describe" >> beam.ParDo(_ExtractShard(
                     backend_factory, max_image_size=max_image_size, batch_size=batch_size,
                     num_threads=max(1, num_workers),
                     tf_threads=local_tf_threads(options))))
        counters = beam_options.counters(p.result, COUNTERS)
        counters.update(beam_options.distributions(p.result, COUNTERS))
    seconds = time.time() - t0
    statuses = []
    for items, out_dir, ranges, mine, done_before, todo in plans:
        missing = [s for s in range(len(ranges))
                   if not files.isfile(extract._shard_paths(out_dir, s)[1])]  # pylint: disable=protected-access
        statuses.append(extract.ExtractionStatus(
            out_dir=out_dir, num_items=len(items), num_shards_total=len(ranges), mine=mine,
            done_before=done_before, done_now=[s for s in todo if s not in missing],
            missing=missing, images_done=sum(ranges[s][1] - ranges[s][0] for s in todo),
            seconds=seconds))
    return statuses, counters
