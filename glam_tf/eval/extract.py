"""Batched, bucketed, sharded and resumable descriptor extraction for evaluation.

Client-side preparation (as DELG's and cirtorch's clients): decode with Pillow (no EXIF
rotation: the ground-truth boxes refer to the stored pixels), crop queries to their box
(Pillow's rounding), resize with bilinear so the FULL image's longer side becomes
`max_image_size` — a query crop keeps that scale, so its longer side becomes
max_image_size * max(crop side) / max(full side). An image whose shorter side would fall
below the model's minimum at its smallest scale is enlarged just enough (reported).

Images with identical resized (H, W) are batched together (up to `batch_size`); each shard
of `shard_size` consecutive items is written as `shard-XXXXX.npy` (descriptors, (n, D)
float32) and `shard-XXXXX.json` (ids, undecodable images with errors, enlarged images),
the JSON last and both by atomic rename: a killed run skips its finished shards and
redoes only the unfinished one. Shard s belongs to host s % num_shards, so the 1M
distractors split over machines; `merge_shards` checks that every shard is there.

Undecodable images get a zero row and are flagged invalid: search ranks invalid
database images LAST (kept in the database, so a positive among them still counts in
AP's denominator), and invalid queries are left out of the mean with a warning.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import time

import numpy as np
from absl import logging
from PIL import Image

from glam_tf import files
from glam_tf.config.contract import DEFAULT_MAX_IMAGE_SIZE
from glam_tf.data import records
from glam_tf.data.progress import ProgressBar

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True, slots=True)
class ImageItem:
    """One image to describe: `id` (name), `path`, optional crop `box` [x1, y1, x2, y2]."""

    id: str
    path: str
    box: tuple = None


class UndecodableImage(Exception):
    """An image file that Pillow cannot open or decode."""


def pil_box(box, width, height):
    """The crop box as Pillow applies it (round each coordinate), clipped to the image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        raise UndecodableImage(f"crop box {list(box)} is empty inside the {width}x{height} image")
    return x1, y1, x2, y2


def target_size(width, height, box, max_image_size, min_side=1):
    """Resized (H, W) of an image (or of its crop), and whether it was enlarged.

    The full image's longer side maps to `max_image_size`; a crop is scaled by the same
    factor (target longer side = max_image_size * max(crop side) / max(full side)).
    A shorter side under `min_side` is raised to it, aspect ratio kept.
    """
    factor = max_image_size / max(width, height)
    if box is not None:
        x1, y1, x2, y2 = pil_box(box, width, height)
        width, height = x2 - x1, y2 - y1
    h, w = max(1, round(height * factor)), max(1, round(width * factor))
    if min(h, w) < min_side:
        up = min_side / min(h, w)
        h, w = max(min_side, round(h * up)), max(min_side, round(w * up))
        return (h, w), True
    return (h, w), False


def read_size(path):
    """(width, height) from the image header; UndecodableImage when it cannot be read."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(records.image_error_text(e)) from e


def load_image(item, size):
    """Decodes, crops and bilinear-resizes `item` to `size` (H, W): uint8 (H, W, 3) RGB."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(item.path))) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(records.image_error_text(e)) from e
    if item.box is not None:
        rgb = rgb.crop(pil_box(item.box, *rgb.size))
    h, w = size
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def plan_batches(sizes, batch_size):
    """Groups item positions by identical size into batches of at most batch_size.

    Args:
        sizes: per item an (H, W) tuple, or None to skip the item.
    Returns:
        A list of position lists, bucket by bucket in first-seen order.
    """
    buckets = collections.OrderedDict()
    for i, s in enumerate(sizes):
        if s is not None:
            buckets.setdefault(tuple(s), []).append(i)
    return [pos[j:j + batch_size] for pos in buckets.values()
            for j in range(0, len(pos), batch_size)]


@dataclasses.dataclass
class ExtractionStatus:
    """What one `extract_split` call found and did for one split."""

    out_dir: str
    num_items: int
    num_shards_total: int
    mine: list
    done_before: list
    done_now: list
    missing: list  # shards (of every host) not finished yet
    images_done: int = 0
    seconds: float = 0.0

    @property
    def complete(self):
        return not self.missing


def shard_ranges(num_items, shard_size):
    """[(start, stop)] of consecutive shards covering num_items."""
    return [(a, min(num_items, a + shard_size)) for a in range(0, num_items, shard_size)]


def _shard_paths(out_dir, shard):
    base = files.join(out_dir, f"shard-{shard:05d}")
    return base + ".npy", base + ".json"


def _ids_digest(items):
    h = hashlib.sha1()
    for it in items:
        h.update(f"{it.id}|{it.box}\n".encode())
    return h.hexdigest()


def read_manifest(out_dir):
    """The settings a split's features were extracted with; FileNotFoundError if none."""
    path = files.join(out_dir, MANIFEST)
    if not files.isfile(path):
        raise FileNotFoundError(f"{out_dir}: no features extracted yet ({MANIFEST} missing); "
                                "run the extract stage first")
    with files.open_file(path) as f:
        return json.load(f)


def _differences(old, new, prefix=""):
    """Dotted keys whose values differ between two manifests (nested dicts walked)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_manifest(out_dir, manifest):
    """Writes the split's manifest, or checks that the one there matches: features of a
    compatible earlier run are reused (and extended), those of another model are refused
    in one line that says what differs and what to do."""
    manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
    path = files.join(out_dir, MANIFEST)
    if files.isfile(path):
        with files.open_file(path) as f:
            old = json.load(f)
        diff = _differences(old, manifest)
        if diff:
            shown = "; ".join(f"{k} {_short(a)} there, {_short(b)} now" for k, a, b in diff[:3])
            more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ValueError(f"{out_dir} holds features extracted with other settings "
                             f"({shown}{more}): pass another --output_dir, or delete "
                             f"{out_dir} to extract again")
        return
    files.makedirs(out_dir)
    files.atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def finished_shards(out_dir, num_shards_total):
    """Indices of shards whose JSON marker exists (written last, atomically)."""
    return [s for s in range(num_shards_total) if files.isfile(_shard_paths(out_dir, s)[1])]


def _describe_shard(items, backend, *, max_image_size, batch_size, pool, on_images):
    """Descriptors (n, D) (zeros for failures) and the shard's JSON record."""
    min_side = backend.min_side()
    sizes, errors, enlarged = [None] * len(items), {}, []
    for i, res in enumerate(pool.map(_safe_size, items)):
        if isinstance(res, Exception):
            errors[i] = str(res)
            continue
        try:
            sizes[i], up = target_size(res[0], res[1], items[i].box, max_image_size, min_side)
        except UndecodableImage as e:
            errors[i] = str(e)
            continue
        if up:
            enlarged.append(items[i].id)
    on_images(len(errors))  # unreadable headers: done, nothing to describe
    batches = plan_batches(sizes, batch_size)
    rows = {}
    prefetch = 2  # batches decoded ahead of the model (bounds memory)

    def submit(batch):
        return batch, [pool.submit(load_image, items[i], sizes[i]) for i in batch]

    pending = collections.deque(submit(b) for b in batches[:prefetch])
    for k in range(len(batches)):
        batch, futures = pending.popleft()
        if k + prefetch < len(batches):
            pending.append(submit(batches[k + prefetch]))
        images, kept = [], []
        for i, fut in zip(batch, futures):
            try:
                images.append(fut.result())
                kept.append(i)
            except UndecodableImage as e:
                errors[i] = str(e)
        if images:
            out = backend(np.stack(images))
            for i, row in zip(kept, out):
                rows[i] = row
        on_images(len(batch))
    dim = next(iter(rows.values())).shape[0] if rows else 0
    desc = np.zeros((len(items), dim), dtype=np.float32)
    for i, row in rows.items():
        desc[i] = row
    record = {
        "ids": [it.id for it in items],
        "undecodable": [{"id": items[i].id, "pos": i, "path": items[i].path,
                         "error": errors[i]} for i in sorted(errors)],
        "enlarged": enlarged,
        "num_batches": len(batches),
    }
    return desc, record


def _safe_size(item):
    try:
        return read_size(item.path)
    except UndecodableImage as e:
        return e


def _extract_shard(items, shard_range, s, out_dir, backend, *, pool, max_image_size, batch_size,
                   on_images, name):
    """Describes items[a:b] (shard s) and writes its .npy, then its .json (atomic each)."""
    a, b = shard_range
    desc, record = _describe_shard(items[a:b], backend, max_image_size=max_image_size,
                                   batch_size=batch_size, pool=pool, on_images=on_images)
    record.update(shard=s, start=a, stop=b)
    npy, js = _shard_paths(out_dir, s)
    files.atomic_write(npy, lambda f: np.save(f, desc))
    files.atomic_write(js, lambda f: f.write(json.dumps(record).encode()))
    for u in record["undecodable"]:
        logging.warning("%s: undecodable image %s (%s): excluded", name, u["path"], u["error"])
    return record


def _prepare_split(items, out_dir, backend, *, max_image_size, shard_size, num_shards,
                   shard_index, settings):
    """Checks/writes the manifest; returns (ranges, mine, done_before, todo)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    ranges = shard_ranges(len(items), shard_size)
    manifest = {"backend": backend.fingerprint, "max_image_size": int(max_image_size),
                "min_side": backend.min_side(), "num_items": len(items),
                "shard_size": int(shard_size), "items_sha1": _ids_digest(items),
                "settings": settings or {}}
    _check_manifest(out_dir, manifest)
    mine = [s for s in range(len(ranges)) if s % num_shards == shard_index]
    done_before = [s for s in finished_shards(out_dir, len(ranges)) if s in set(mine)]
    todo = [s for s in mine if s not in set(done_before)]
    for s in todo:  # leftovers of a killed run (only this host writes these shards)
        for stale in files.glob(files.join(out_dir, f"shard-{s:05d}.*.tmp-*")):
            files.remove(stale)
    return ranges, mine, done_before, todo


def extract_split(items, out_dir, backend, *, max_image_size=DEFAULT_MAX_IMAGE_SIZE,
                  batch_size=8, shard_size=1000, num_shards=1, shard_index=0, num_workers=2,
                  settings=None, name="", log_every_s=30.0):
    """Describes `items` into shard files under `out_dir`, skipping finished shards.

    Args:
        items: list of `ImageItem`, in database/query index order.
        out_dir: folder of this split's shards (created).
        backend: a glam_tf.eval.models.DescriptorBackend (callable on uint8 batches).
        max_image_size: longer side of the full images after the client resize.
        batch_size: images per model call (same-size images only).
        shard_size: items per shard file.
        num_shards, shard_index: this host does the shards s with s % num_shards ==
            shard_index (split work over machines; merge when all are done).
        num_workers: threads decoding and resizing ahead of the model.
        settings: extra JSON-able values that must match for finished shards to be reused.
        name: label for progress lines.

    Returns:
        An `ExtractionStatus`.
    """
    ranges, mine, done_before, todo = _prepare_split(
        items, out_dir, backend, max_image_size=max_image_size, shard_size=shard_size,
        num_shards=num_shards, shard_index=shard_index, settings=settings)
    total = sum(ranges[s][1] - ranges[s][0] for s in todo)
    if done_before:
        logging.info("%s: %d/%d of this host's shards already done in %s; resuming", name,
                     len(done_before), len(mine), out_dir)
    bar = ProgressBar(total, unit="images", description=f"extract {name}".strip(),
                      log_every_s=log_every_s, enabled=total > 0)
    done_images = 0
    t0 = time.time()
    done_now = []

    def on_images(n):
        nonlocal done_images
        done_images += n
        bar.update(done_images)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for s in todo:
            _extract_shard(items, ranges[s], s, out_dir, backend, pool=pool,
                           max_image_size=max_image_size, batch_size=batch_size,
                           on_images=on_images, name=name)
            done_now.append(s)
    if total:
        bar.close()
    missing = [s for s in range(len(ranges))
               if not files.isfile(_shard_paths(out_dir, s)[1])]
    return ExtractionStatus(out_dir=out_dir, num_items=len(items), num_shards_total=len(ranges),
                            mine=mine, done_before=done_before, done_now=done_now,
                            missing=missing, images_done=done_images,
                            seconds=time.time() - t0)


@dataclasses.dataclass
class MergedFeatures:
    """All shards of one split, in item order."""

    descriptors: np.ndarray  # (N, D) float32, zero rows for invalid items
    valid: np.ndarray  # (N,) bool
    undecodable: list  # [{"id", "path", "error", "index"}]
    enlarged: list


def merge_shards(out_dir, ids, *, num_hosts=None, out=None):
    """Reads every shard of a split and checks it is complete and matches `ids`.

    Args:
        out_dir: the split's shard folder.
        ids: expected item ids in order.
        num_hosts: the --num_shards used, to say which host owes a missing shard.
        out: optional preallocated (N, D) float32 array to fill (e.g. a slice of a bigger
            database matrix); allocated when None.

    Raises:
        FileNotFoundError: shards missing (listed, with the host that should write them).
        ValueError: a shard's ids, row count, dimension or values are wrong.
    """
    manifest = read_manifest(out_dir)
    if manifest["num_items"] != len(ids):
        raise ValueError(f"{out_dir}: features of {manifest['num_items']} items, expected "
                         f"{len(ids)}")
    ranges = shard_ranges(len(ids), manifest["shard_size"])
    missing = [s for s in range(len(ranges)) if not files.isfile(_shard_paths(out_dir, s)[1])]
    if missing:
        hosts = (f"; with --num_shards={num_hosts} they belong to --shard_index "
                 f"{sorted({s % num_hosts for s in missing})}" if num_hosts else "")
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise FileNotFoundError(f"{out_dir}: {len(missing)} of {len(ranges)} shards not "
                                f"extracted yet (shards {shown}){hosts}")
    valid = np.ones(len(ids), dtype=bool)
    undecodable, enlarged, empty = [], [], []
    dim = None
    for s, (a, b) in enumerate(ranges):
        npy, js = _shard_paths(out_dir, s)
        with files.open_file(js) as f:
            record = json.load(f)
        if record["ids"] != list(ids[a:b]):
            raise ValueError(f"{js}: ids differ from the expected items {a}..{b - 1}")
        with files.open_file(npy, "rb") as f:
            desc = np.load(f, allow_pickle=False)
        if desc.shape[0] != b - a:
            raise ValueError(f"{npy}: {desc.shape[0]} rows, expected {b - a}")
        if desc.shape[1]:
            if dim is None:
                dim = desc.shape[1]
                if out is None:
                    out = np.zeros((len(ids), dim), dtype=np.float32)
                elif out.shape != (len(ids), dim):
                    raise ValueError(f"out has shape {out.shape}, expected {(len(ids), dim)}")
            elif desc.shape[1] != dim:
                raise ValueError(f"{npy}: descriptor dimension {desc.shape[1]}, others {dim}")
            if not np.isfinite(desc).all():
                raise ValueError(f"{npy}: non-finite descriptors (the model produced NaN/inf)")
            out[a:b] = desc
        else:  # every image of the shard failed: no dimension to write rows with
            empty.append((a, b))
        for u in record["undecodable"]:
            k = a + u["pos"]
            valid[k] = False
            undecodable.append(dict(u, index=k))
        enlarged.extend(record["enlarged"])
    if dim is None:
        raise ValueError(f"{out_dir}: every image is undecodable; nothing to evaluate")
    for a, b in empty:
        out[a:b] = 0.0
    return MergedFeatures(descriptors=out, valid=valid, undecodable=undecodable,
                          enlarged=enlarged)
