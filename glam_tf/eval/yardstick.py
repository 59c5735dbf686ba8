"""A method with no learning to measure trained models against: a colour histogram.

On the paper's photos a colour histogram is far below a CNN; on a test set where it is not,
colour or position (not structure) names the landmark, and a trained model's mAP there says
little about what it learned. Every table of trained models on the synthetic splits carries
these rows beside them (bench/ablation.py, the demo's closing lines).

The descriptor of an RGB image (uint8, (H, W, 3)):
  1. each pixel's bin: (R // 32, G // 32, B // 32), 8 x 8 x 8 = 512 bins;
  2. counts per bin divided by the number of pixels (a distribution p, sum 1);
  3. the element-wise square root sqrt(p) (Hellinger kernel), then L2-normalised (sqrt(p)
     has norm 1 already: the step only removes rounding);
  4. similarity: the inner product of two descriptors (their cosine).
Two regions of each image are described, each its own row:
  - "whole": every pixel of the image;
  - "central": the central half, rows H // 4 to H - H // 4 and columns W // 4 to
    W - W // 4 (exclusive ends): half the width and half the height, centred (a quarter of
    the area; one more row or column than half when the side is odd).
Images are read at their stored size (a normalised histogram hardly depends on the scale).
Queries are cropped to their box first, as the evaluator crops them (Pillow's rounding:
glam_tf.eval.extract.pil_box), and the region is taken inside the crop. The ranking of
every query over the whole database is scored by the revisited protocol
(glam_tf.eval.metrics: Easy, Medium, Hard).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from glam_tf import files
from glam_tf.data import testsets
from glam_tf.eval import extract, metrics, search

BINS_PER_CHANNEL = 8
NUM_BINS = BINS_PER_CHANNEL ** 3
REGIONS = ("whole", "central")
LABELS = {"whole": "colour histogram, whole photo (no learning)",
          "central": "colour histogram, central half (no learning)"}


def central_half(rgb: np.ndarray) -> np.ndarray:
    """Rows H // 4 .. H - H // 4 and columns W // 4 .. W - W // 4 of (H, W, ...) `rgb`."""
    h, w = rgb.shape[:2]
    return rgb[h // 4:h - h // 4, w // 4:w - w // 4]


def histogram_descriptor(rgb: np.ndarray) -> np.ndarray:
    """(512,) float32 descriptor of uint8 (H, W, 3) `rgb`: L2-normalised square root of the
    normalised 8 x 8 x 8 RGB histogram (bin index r * 64 + g * 8 + b of the values // 32)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"histogram_descriptor needs a non-empty uint8 (H, W, 3) image, got "
                         f"{rgb.dtype} {rgb.shape}")
    q = (rgb >> 5).reshape(-1, 3).astype(np.intp)
    counts = np.bincount((q[:, 0] * BINS_PER_CHANNEL + q[:, 1]) * BINS_PER_CHANNEL + q[:, 2],
                         minlength=NUM_BINS).astype(np.float64)
    d = np.sqrt(counts / counts.sum())
    return (d / np.linalg.norm(d)).astype(np.float32)


def read_rgb(path: str, box=None) -> np.ndarray:
    """uint8 (H, W, 3) pixels of the image at `path`, cropped to `box` [x1, y1, x2, y2] as
    the evaluator crops queries; ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as im:
            rgb = im.convert("RGB")
        if box is not None:
            rgb = rgb.crop(extract.pil_box(box, *rgb.size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            extract.UndecodableImage) as e:
        raise ValueError(f"{path}: cannot be read for the colour histogram ({e})") from e
    return np.asarray(rgb, dtype=np.uint8)


def describe(images) -> dict:
    """{region: (N, 512) float32} descriptors of each uint8 (H, W, 3) image in `images`."""
    out = {region: [] for region in REGIONS}
    for rgb in images:
        out["whole"].append(histogram_descriptor(rgb))
        out["central"].append(histogram_descriptor(central_half(rgb)))
    return {region: np.stack(d).reshape(-1, NUM_BINS) for region, d in out.items()}


def score(queries: np.ndarray, database: np.ndarray, gnd) -> dict:
    """Revisited mAP (%) of ranking `database` (N, D) by inner product with `queries` (Q, D):
    {"easy": .., "medium": .., "hard": ..} (exact search, glam_tf.eval.search)."""
    tracked = [np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in gnd]
    res = search.exact_search(queries, database, k=min(10, len(database)), tracked=tracked,
                              log_every_s=1e9)
    scores = metrics.evaluate_setups(gnd, res.rank_of)
    return {s: scores[s]["mAP"] for s in metrics.SETUPS}


def evaluate(root: str, dataset: str) -> dict:
    """{region: {"easy", "medium", "hard": mAP %}} of the colour histogram on the revisited
    test set `dataset` under `root` (e.g. a synthetic set's "synth" or "synth_val")."""
    ts = testsets.load_testset(root, dataset)
    queries = describe(read_rgb(ts.query_path(name), g["bbx"])
                       for name, g in zip(ts.qimlist, ts.gnd))
    database = describe(read_rgb(path) for path in ts.database_paths())
    return {region: score(queries[region], database[region], ts.gnd) for region in REGIONS}


def format_lines(results: dict) -> str:
    """One line per region: `<label>: mAP E 12.34 M 23.45 H 3.21`."""
    return "\n".join(f"{LABELS[region].capitalize()}: mAP " + " ".join(
        f"{s[0].upper()} {results[region][s]:.2f}" for s in metrics.SETUPS)
        for region in REGIONS)
