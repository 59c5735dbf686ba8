"""Helpers shared by the tests, without TensorFlow (test files import from here or from
keras_helpers, never from each other).

pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode, no __init__.py),
so test files `import helpers`; a subprocess adds TESTS_DIR to sys.path itself.

Retrieval references and fixtures: `ref_compute_map` (cirtorch compute_map written the
straightforward way), `fake_backend` (a NumPy descriptor back-end), `write_tiny_revisited`
(a tiny roxford5k-layout data set) with the `SCALES` and `MAX_SIZE` the tests describe it at.
Crafted images: `huge_png` (a PNG whose header declares a huge size).
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib

import numpy as np
from PIL import Image

from glam_tf.eval import models

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


# ----------------------------------------------------------------------------- retrieval

def ref_compute_ap(ranks, nres):
    """cirtorch compute_ap: AP from the 0-based ranks of the positives (trapezoid rule)."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranking, gnd, kappas=(1, 5, 10)):
    """cirtorch compute_map, written the straightforward way.

    Args:
        ranking: `(N, Q)` full argsort, column i ranks the database for query i.
        gnd: per query {'ok': positives, 'junk': ignored}.
        kappas: the k of mP@k.

    Returns:
        (mAP, mP@k per kappa, per-query APs with NaN for queries without positives).
    """
    nq = len(gnd)
    aps, prs, nempty = np.zeros(nq), np.zeros((nq, len(kappas))), 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i] = np.nan
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranking.shape[0])[np.isin(ranking[:, i], qgnd)]
        junk = np.arange(ranking.shape[0])[np.isin(ranking[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps[i] = ref_compute_ap(pos, len(qgnd))
        pos = pos + 1
        for j, kap in enumerate(kappas):
            kq = min(max(pos), kap)
            prs[i, j] = (pos <= kq).sum() / kq
    valid = ~np.isnan(aps)
    return aps[valid].mean(), prs[valid].mean(axis=0), aps


def fake_descriptor_fn(images):
    """A deterministic NumPy 'model': colour statistics and the size, L2-normalised."""
    x = images.astype(np.float64) / 255.0
    feats = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)),
                            np.tile([[images.shape[1] / 100, images.shape[2] / 100]],
                                    (len(images), 1))], axis=1)
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def fake_backend(fn=fake_descriptor_fn, fingerprint="fake-v1"):
    """A DescriptorBackend over a NumPy function (no TensorFlow), scales (1/sqrt 2, 1)."""
    return models.DescriptorBackend(fn=fn, scales=(0.70710678, 1.0), info={"kind": "fake"},
                                    fingerprint=fingerprint)


SCALES = (0.70710678, 1.0)
MAX_SIZE = 64


def write_tiny_revisited(root, *, distractors=True):
    """roxford5k layout: 8 database images (db7 undecodable), 3 queries with boxes (q2
    undecodable), and 3 revisitop1m distractors (one undecodable)."""
    rng = np.random.default_rng(0)
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    imlist = [f"db{i}" for i in range(8)]
    qimlist = ["q0", "q1", "q2"]
    base = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    for i, name in enumerate(imlist + qimlist):
        img = np.roll(base, 5 * i, axis=1)
        img = 255 - img if i % 2 else img
        if i % 3 == 2:
            img = img.transpose(1, 0, 2)
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2)).save(jpg / f"{name}.jpg")
    (jpg / "db7.jpg").write_bytes(b"not an image")
    (jpg / "q2.jpg").write_bytes(b"")
    gnd = [{"bbx": [4.0, 6.5, 120.0, 90.0], "easy": np.array([0, 1]), "hard": np.array([2]),
            "junk": np.array([3])},
           {"bbx": [0.0, 0.0, 500.0, 500.0],  # clipped to the image
            "easy": np.array([4]), "hard": np.array([7]), "junk": np.array([], dtype=int)},
           {"bbx": [0.0, 0.0, 10.0, 10.0], "easy": np.array([5]), "hard": np.array([6]),
            "junk": np.array([], dtype=int)}]
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=2)
    if distractors:
        d = root / "revisitop1m" / "jpg" / "0" / "00"
        d.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((40, 56, 3), 40 * k, np.uint8)).save(d / f"x{k}.jpg")
        (d / "x1.jpg").write_bytes(b"")
        (root / "revisitop1m" / "revisitop1m.txt").write_text(
            "0/00/x0.jpg\n0/00/x1.jpg\n0/00/x2.jpg\n")
    return imlist, qimlist, gnd


# ----------------------------------------------------------------------------- crafted images

def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(w, h):
    """A valid-looking PNG (correct CRCs) declaring w x h RGB with a few bytes of pixel data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
