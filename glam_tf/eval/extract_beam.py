"""Descriptor extraction as one Apache Beam pipeline (queries, database, distractors).

The driver checks each split's manifest (glam_tf.eval.extract), writes the split's item
list next to it (`items.json`) and plans the unfinished shards; the pipeline's elements are
(split folder, shard index). A `DoFn` loads the model once per worker in `setup()` (from a
picklable `backend_factory`, e.g. `BackendSpec`: Beam's own TensorFlow model handler loads
with Keras's `load_model`, which refuses a SavedModel under Keras 3) and describes each shard
exactly as the in-process path does (size buckets, decode threads, same shard files), so
`merge_shards` and the evaluate stage read them unchanged. Undecodable images are listed in
the shard JSON as before and counted with Beam counters (namespace `glam_extract`).

The runner is the DirectRunner with 2 worker processes unless Beam flags say otherwise
(glam_tf.beam_options): on a cluster `--stage=extract` with `--runner=...` replaces the manual
`--num_shards/--shard_index` hosts (which still work: a run does the shards s with
s % num_shards == shard_index). The feature folder must be one every worker can write.
"""

import concurrent.futures
import dataclasses
import json
import os
import time

import apache_beam as beam

from glam_tf import beam_options
from glam_tf.eval import extract
from glam_tf.files import atomic_write

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
        from glam_tf.eval import models  # pylint: disable=g-import-not-at-top

        return models.build_backend(model=self.model or None, train_dir=self.train_dir or None,
                                    scales=self.scales, max_image_size=self.max_image_size,
                                    inference=self.inference)


def _write_items(out_dir, items):
    rows = [[it.id, it.path, list(it.box) if it.box is not None else None] for it in items]
    atomic_write(os.path.join(out_dir, ITEMS_FILE), lambda f: f.write(json.dumps(rows).encode()))


def _read_items(out_dir):
    with open(os.path.join(out_dir, ITEMS_FILE), encoding="utf-8") as f:
        return [extract.ImageItem(i, p, None if b is None else tuple(b)) for i, p, b in json.load(f)]


class _ExtractShard(beam.DoFn):
    """Describes one shard (element: (split folder, shard, label)); the model loads once."""

    def __init__(self, backend_factory, *, max_image_size, batch_size, num_threads):
        super().__init__()
        self._factory = backend_factory
        self._max_image_size = max_image_size
        self._batch_size = batch_size
        self._num_threads = num_threads
        self._images = beam.metrics.Metrics.counter(COUNTERS, "images_described")
        self._undecodable = beam.metrics.Metrics.counter(COUNTERS, "images_undecodable")
        self._shards = beam.metrics.Metrics.counter(COUNTERS, "shards_written")

    def setup(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self._backend = self._factory()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self._num_threads)
        self._items = {}

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown()

    def process(self, element):
        out_dir, s, name = element
        if out_dir not in self._items:
            manifest = extract.read_manifest(out_dir)
            items = _read_items(out_dir)
            self._items[out_dir] = (items, extract.shard_ranges(len(items),
                                                                manifest["shard_size"]))
        items, ranges = self._items[out_dir]
        record = extract._extract_shard(  # pylint: disable=protected-access
            items, ranges[s], s, out_dir, self._backend, pool=self._pool,
            max_image_size=self._max_image_size, batch_size=self._batch_size,
            on_images=lambda n: None, name=name)
        a, b = ranges[s]
        self._images.inc(b - a - len(record["undecodable"]))
        self._undecodable.inc(len(record["undecodable"]))
        self._shards.inc()
        yield out_dir, s


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
        beam_args: Beam flags; None = DirectRunner, 2 worker processes.
        max_image_size, batch_size, shard_size, num_shards, shard_index, settings: as
            `extract.extract_split`.
        num_workers: decoding threads per Beam worker.

    Returns:
        (statuses, counters): one `ExtractionStatus` per job; the run's Beam counters.
    """
    options = beam_options.pipeline_options(beam_args)
    plans, elements = [], []
    for items, out_dir, name in jobs:
        ranges, mine, done_before, todo = extract._prepare_split(  # pylint: disable=protected-access
            items, out_dir, backend, max_image_size=max_image_size, shard_size=shard_size,
            num_shards=num_shards, shard_index=shard_index, settings=settings)
        if todo:
            _write_items(out_dir, items)
        plans.append((items, out_dir, ranges, mine, done_before, todo))
        elements += [(out_dir, s, name) for s in todo]
    t0 = time.time()
    counters = {}
    if elements:
        with beam.Pipeline(options=options) as p:
            _ = (p
                 | "Shards" >> beam.Create(elements)
                 | "Spread" >> beam.Reshuffle()
                 | "Describe" >> beam.ParDo(_ExtractShard(
                     backend_factory, max_image_size=max_image_size, batch_size=batch_size,
                     num_threads=max(1, num_workers))))
        counters = beam_options.counters(p.result, COUNTERS)
    seconds = time.time() - t0
    statuses = []
    for items, out_dir, ranges, mine, done_before, todo in plans:
        missing = [s for s in range(len(ranges))
                   if not os.path.isfile(extract._shard_paths(out_dir, s)[1])]  # pylint: disable=protected-access
        statuses.append(extract.ExtractionStatus(
            out_dir=out_dir, num_items=len(items), num_shards_total=len(ranges), mine=mine,
            done_before=done_before, done_now=[s for s in todo if s not in missing],
            missing=missing, images_done=sum(ranges[s][1] - ranges[s][0] for s in todo),
            seconds=seconds))
    return statuses, counters
