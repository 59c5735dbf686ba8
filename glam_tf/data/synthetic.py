"""Synthetic landmarks: procedural facades photographed under varied viewpoint, light, occlusion.

A seeded, deterministic stand-in for GLDv2 + revisited Oxford, small enough to generate in
seconds, so the demo and tests run the real code paths (GLDv2 csv -> TFRecords -> pipeline;
revisited gnd pickle -> evaluation) without downloads.

A landmark is a structure: building outline, roof (gable, dome, towers, spire, mansard,
stepped, flat), a window grid (count, shape, skipped cells, frames, mullions), door, portico
columns, floor bands and a wall texture (brick, stone blocks, bands, ribs, stucco). By default
colour is NOT part of the landmark: every photo draws a fresh palette, so mean colour says
nothing about identity; only structure does (`palette_variation` < 1 keeps some of each
building's own colours). A photo applies a homography (viewpoint, rotation, scale,
crop), illumination (gain, colour cast, gradient shadow, gamma), occluders (trees, poles,
vehicles, signs), blur, noise and JPEG compression.

Output under `root`:
  train_clean.csv, train/<a>/<b>/<c>/<id>.jpg      GLDv2 layout (16-hex ids, sparse landmark ids)
  synth/jpg/<name>.jpg, synth/gnd_synth.pkl         revisited layout, dataset name "synth"
  synthetic_manifest.json                           parameters, landmark of every image
  .synthetic_complete.json                          marker, written last

Test landmarks (queries and their database photos) and distractor landmarks are disjoint from
the training landmarks. Queries are separate photos (not in the database) with a box around
the building; database photos of the query's landmark are easy, hard or junk by how strong the
change is (mild viewpoint/occlusion -> easy; strong -> hard; extreme or mostly occluded -> junk).
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import time

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFilter

from glam_tf.data import progress as progress_lib
from glam_tf.files import atomic_write, write_json_atomic

MARKER_NAME = ".synthetic_complete.json"
MANIFEST_NAME = "synthetic_manifest.json"
DATASET_NAME = "synth"

# Material ids of the scene map.
SKY, GROUND, WALL, WINDOW, ROOF, COLUMN, DOOR, TRIM = range(8)
NUM_MATERIALS = 8
BUILDING_MATERIALS = (WALL, WINDOW, ROOF, COLUMN, DOOR, TRIM)
_IS_BUILDING = np.isin(np.arange(256), BUILDING_MATERIALS)
SHADE_LEVELS = 64
SHADE_RANGE = (0.5, 1.1)

# Photo shapes: (width, height) relative to the longer side, and their frequency. h/w spans
# all five default aspect groups of the training pipeline.
_SHAPES = ((1.0, 0.75), (0.75, 1.0), (1.0, 1.0), (1.0, 0.625), (0.625, 1.0))
_SHAPE_P = (0.35, 0.25, 0.15, 0.15, 0.10)

# Strength of the photo change per level (0 = canonical view).
LEVELS = ("train", "query", "easy", "hard", "junk", "distractor")


@dataclasses.dataclass(frozen=True)
class LandmarkScene:
    """A landmark's structure on its canvas.

    Attributes:
      material: uint8 (S, S) material id per pixel (SKY, GROUND, WALL, ...).
      shade: float32 (S, S) texture multiplier in about [0.6, 1.05] (brick, stone, ...).
      bbox: (x0, y0, x1, y1) canvas pixels enclosing the building, roof included.
      index: intp (S, S) material * SHADE_LEVELS + quantised shade: one gather through a
        per-photo colour table renders the canvas.
    """

    material: np.ndarray
    shade: np.ndarray
    bbox: tuple
    index: np.ndarray


def _rng(seed: int, *keys) -> np.random.Generator:
    """A generator seeded by (seed, keys...): independent of process and call order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


def _cell_hash(i, j, salt):
    """Deterministic pseudo-random value in [0, 1) per integer cell (i, j), vectorised."""
    v = np.sin(i * 12.9898 + j * 78.233 + salt * 37.719) * 43758.5453
    return v - np.floor(v)


def _smooth_noise(rng, size, cells):
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32)


def render_scene(seed: int, landmark: int, canvas: int) -> LandmarkScene:
    """Draws landmark number `landmark` of the family `seed` on an S x S canvas (S = canvas).

    Pure function of (seed, landmark, canvas): the same arguments give the same arrays.
    """
    rng = _rng(seed, 1, landmark)
    s = canvas
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
    mat = np.full((s, s), SKY, np.uint8)
    shade = np.ones((s, s), np.float32)

    ground_y = rng.uniform(0.74, 0.86)
    mat[y >= ground_y] = GROUND
    shade = np.where(mat == SKY, 1.05 - 0.3 * y / ground_y, shade)  # sky brightens downwards
    ground_tex = _smooth_noise(rng, s, 24)
    paving = (np.abs(((x - 0.5) / np.maximum(y - ground_y + 0.05, 0.05)) * 3.0 % 1.0 - 0.5) < 0.04)
    shade = np.where(mat == GROUND, 0.8 + 0.2 * ground_tex - 0.15 * paving, shade)

    bw = rng.uniform(0.36, 0.58)          # wall width
    wall_h = rng.uniform(0.24, 0.42)      # wall height
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    x0, x1 = cx - bw / 2, cx + bw / 2
    top = ground_y - wall_h
    bbox = [x0, top, x1, ground_y]

    def put(mask, material):
        mat[mask] = material

    # Side wings: lower blocks either side.
    if rng.random() < 0.35:
        wing_w = rng.uniform(0.06, 0.12)
        wing_top = ground_y - wall_h * rng.uniform(0.45, 0.75)
        wing = (y >= wing_top) & (y < ground_y) & (
            ((x >= x0 - wing_w) & (x < x0)) | ((x >= x1) & (x < x1 + wing_w)))
        put(wing, WALL)
        bbox[0], bbox[2] = x0 - wing_w, x1 + wing_w
        # wing windows: one column of small squares per wing
        wy = ((y - wing_top) / (ground_y - wing_top) * 3) % 1.0
        for wx0 in (x0 - wing_w, x1):
            wx = (x - wx0) / wing_w
            put(wing & (np.abs(wx - 0.5) < 0.22) & (np.abs(wy - 0.5) < 0.25), WINDOW)

    wall = (x >= x0) & (x < x1) & (y >= top) & (y < ground_y)
    put(wall, WALL)

    # Roof.
    roof_kind = rng.integers(7)
    roof_h = rng.uniform(0.08, 0.2)
    if roof_kind == 0:  # gable
        over = rng.uniform(0.0, 0.03)
        t = (top - y) / roof_h
        put((t >= 0) & (t < 1) & (np.abs(x - cx) < (bw / 2 + over) * (1 - t)), ROOF)
        bbox[1] = top - roof_h
    elif roof_kind == 1:  # dome + lantern
        rw = bw * rng.uniform(0.22, 0.42)
        put((y < top) & (((x - cx) / rw) ** 2 + ((y - top) / roof_h) ** 2 < 1), ROOF)
        lw, lh = rw * 0.18, roof_h * 0.35
        put((np.abs(x - cx) < lw) & (y < top - roof_h * 0.9) & (y >= top - roof_h - lh), TRIM)
        bbox[1] = top - roof_h - lh
    elif roof_kind == 2:  # two towers with spires
        tw = bw * rng.uniform(0.12, 0.2)
        th = roof_h * rng.uniform(0.8, 1.5)
        sp = roof_h * rng.uniform(0.6, 1.2)
        for tx in (x0 + tw / 2, x1 - tw / 2):
            put((np.abs(x - tx) < tw / 2) & (y >= top - th) & (y < top), WALL)
            t = (top - th - y) / sp
            put((t >= 0) & (t < 1) & (np.abs(x - tx) < tw / 2 * (1 - t)), ROOF)
            put((np.abs(x - tx) < tw * 0.18) & (np.abs(y - (top - th * 0.55)) < th * 0.2), WINDOW)
        bbox[1] = top - th - sp
    elif roof_kind == 3:  # central tower with spire
        tw = bw * rng.uniform(0.12, 0.22)
        th = roof_h * rng.uniform(1.0, 2.0)
        sp = roof_h * rng.uniform(0.8, 1.6)
        put((np.abs(x - cx) < tw / 2) & (y >= top - th) & (y < top), WALL)
        t = (top - th - y) / sp
        put((t >= 0) & (t < 1) & (np.abs(x - cx) < tw / 2 * (1 - t)), ROOF)
        put((((x - cx) / (tw * 0.3)) ** 2 + ((y - (top - th * 0.6)) / (tw * 0.3)) ** 2) < 1, TRIM)
        bbox[1] = top - th - sp
    elif roof_kind == 4:  # mansard (trapezoid) with dormers
        inset = bw * rng.uniform(0.06, 0.14)
        t = (top - y) / roof_h
        put((t >= 0) & (t < 1) & (np.abs(x - cx) < bw / 2 - inset * t), ROOF)
        nd = rng.integers(2, 6)
        u = (x - x0 - inset) / (bw - 2 * inset) * nd
        put((t > 0.2) & (t < 0.7) & (u >= 0) & (u < nd) & (np.abs(u % 1.0 - 0.5) < 0.15), WINDOW)
        bbox[1] = top - roof_h
    elif roof_kind == 5:  # stepped
        steps = rng.integers(2, 4)
        for k in range(steps):
            w = bw / 2 * (1 - (k + 1) / (steps + 1))
            st = top - roof_h * (k + 1) / steps
            put((np.abs(x - cx) < w) & (y >= st) & (y < st + roof_h / steps), WALL)
            put((np.abs(x - cx) < w + 0.005) & (np.abs(y - st) < 0.006), TRIM)
        bbox[1] = top - roof_h
    else:  # flat with cornice and balustrade
        put((x >= x0 - 0.01) & (x < x1 + 0.01) & (y >= top - 0.015) & (y < top + 0.01), TRIM)
        bal = (x >= x0) & (x < x1) & (y >= top - 0.045) & (y < top - 0.015)
        put(bal & ((x * 90) % 1.0 < 0.45), TRIM)
        bbox[1] = top - 0.045

    # Wall texture.
    tex_kind = rng.integers(5)
    u, v = (x - x0) * s, (y - top) * s
    if tex_kind == 0:  # brick
        bh_px = rng.uniform(0.012, 0.02) * s
        row = np.floor(v / bh_px)
        uu = u / (bh_px * 2.2) + 0.5 * (row % 2)
        mortar = ((v / bh_px) % 1.0 < 0.15) | (uu % 1.0 < 0.07)
        tex = np.where(mortar, 0.72, 0.9 + 0.1 * _cell_hash(row, np.floor(uu), landmark))
    elif tex_kind == 1:  # stone blocks
        bh_px = rng.uniform(0.03, 0.05) * s
        row = np.floor(v / bh_px)
        uu = u / (bh_px * 1.7) + 0.37 * (row % 3)
        joint = ((v / bh_px) % 1.0 < 0.06) | (uu % 1.0 < 0.04)
        tex = np.where(joint, 0.7, 0.85 + 0.15 * _cell_hash(row, np.floor(uu), landmark))
    elif tex_kind == 2:  # horizontal bands
        period = rng.uniform(0.02, 0.05) * s
        tex = np.where((v / period) % 1.0 < 0.5, 1.0, 0.82)
    elif tex_kind == 3:  # vertical ribs
        period = rng.uniform(0.015, 0.035) * s
        tex = 0.85 + 0.15 * np.cos(2 * np.pi * u / period)
    else:  # stucco
        tex = 0.8 + 0.2 * _smooth_noise(rng, s, 40)
    tex = tex.astype(np.float32)
    shade = np.where(mat == WALL, tex, shade)
    roof_lines = 0.85 + 0.15 * ((y * s / rng.uniform(3, 7)) % 1.0 < 0.5)
    shade = np.where(mat == ROOF, roof_lines, shade)

    # Floor bands.
    floors = int(rng.integers(1, 6))
    floor_h = (ground_y - top) / floors
    fv = (y - top) / floor_h
    if rng.random() < 0.6:
        put(wall & (fv % 1.0 < 0.06) & (fv > 0.5), TRIM)

    # Window grid.
    cols = int(rng.integers(2, 10))
    margin = bw * rng.uniform(0.04, 0.12)
    cell_w = (bw - 2 * margin) / cols
    fu = (x - x0 - margin) / cell_w
    col = np.floor(fu)
    row = np.floor(fv)
    keep = rng.random((floors, cols)) > rng.choice([0.0, 0.0, 0.15, 0.3])
    if rng.random() < 0.3:
        keep[:, cols // 2] = False
    in_grid = (col >= 0) & (col < cols) & (row >= 0) & (row < floors)
    ci = np.clip(col, 0, cols - 1).astype(np.int32)
    ri = np.clip(row, 0, floors - 1).astype(np.int32)
    in_grid &= keep[ri, ci]
    a = fu % 1.0 - 0.5                     # -0.5..0.5 across the cell
    b = fv % 1.0                            # 0..1 down the floor
    ww = rng.uniform(0.2, 0.36)             # half width of a window, cell units
    wt, wb = rng.uniform(0.18, 0.32), rng.uniform(0.7, 0.85)
    shape = rng.integers(4)
    if shape == 0:    # rectangle
        win = (np.abs(a) < ww) & (b > wt) & (b < wb)
    elif shape == 1:  # arched
        r_b = ww * cell_w / floor_h
        win = (np.abs(a) < ww) & (((b > wt + r_b) & (b < wb)) |
                                  ((a / ww) ** 2 + ((b - wt - r_b) / r_b) ** 2 < 1))
    elif shape == 2:  # round / oval
        win = (a / ww) ** 2 + ((b - (wt + wb) / 2) / ((wb - wt) / 2)) ** 2 < 1
    else:             # tall narrow pair
        win = (np.abs(np.abs(a) - ww * 0.55) < ww * 0.35) & (b > wt) & (b < wb)
    frame = (np.abs(a) < ww + 0.06) & (b > wt - 0.05) & (b < wb + 0.06)
    if rng.random() < 0.6:
        put(wall & in_grid & frame, TRIM)
    put(wall & in_grid & win, WINDOW)
    if rng.random() < 0.5:  # mullions
        put(wall & in_grid & win & ((np.abs(a) < 0.025) | (np.abs(b - (wt + wb) / 2) < 0.02)),
            TRIM)
    glass = 0.75 + 0.3 * np.clip((b - wt) / max(wb - wt, 1e-3), 0, 1)
    shade = np.where(mat == WINDOW, glass, shade)

    # Door or portico.
    if rng.random() < 0.4:
        pw = bw * rng.uniform(0.35, 0.7)
        ph = min(floor_h * rng.uniform(1.0, 1.6), ground_y - top)
        ptop = ground_y - ph
        region = (np.abs(x - cx) < pw / 2) & (y >= ptop) & (y < ground_y)
        put(region, DOOR)
        ncol = int(rng.integers(4, 9))
        cu = (x - (cx - pw / 2)) / pw * (ncol - 1) + 0.5
        put(region & (np.abs(cu % 1.0 - 0.5) < 0.18) & (cu >= 0) & (cu < ncol), COLUMN)
        ped_h = ph * rng.uniform(0.2, 0.4)
        t = (ptop - y) / ped_h
        put((t >= 0) & (t < 1) & (np.abs(x - cx) < (pw / 2 + 0.01) * (1 - t)), TRIM)
        put(region & (y > ground_y - 0.015) & ((y * s) % 4 < 2), TRIM)  # steps
        bbox[1] = min(bbox[1], ptop - ped_h)
        shade = np.where(mat == COLUMN, 0.8 + 0.25 * np.cos(np.pi * (cu % 1.0 - 0.5) / 0.36),
                         shade)
    else:
        dw = cell_w * rng.uniform(0.5, 0.9)
        dh = floor_h * rng.uniform(0.6, 0.85)
        dx = cx if rng.random() < 0.7 else x0 + margin + cell_w * (0.5 + rng.integers(cols))
        door = (np.abs(x - dx) < dw / 2) & (y >= ground_y - dh) & (y < ground_y)
        if rng.random() < 0.5:
            door |= (((x - dx) / (dw / 2)) ** 2 + ((y - (ground_y - dh)) / (dw / 2)) ** 2 < 1)
        put(door, DOOR)

    weather = 0.92 + 0.08 * _smooth_noise(rng, s, 12)
    shade = (shade * np.where(np.isin(mat, BUILDING_MATERIALS), weather, 1.0)).astype(np.float32)
    bbox_px = tuple(float(np.clip(c * s, 0, s)) for c in bbox)
    lo, hi = SHADE_RANGE
    level = np.clip(np.round((shade - lo) / (hi - lo) * (SHADE_LEVELS - 1)), 0, SHADE_LEVELS - 1)
    index = mat.astype(np.intp) * SHADE_LEVELS + level.astype(np.intp)
    return LandmarkScene(material=mat, shade=shade, bbox=bbox_px, index=index)


# ---------------------------------------------------------------------------- photographs


def _hsv_to_rgb(h, s, v):
    """Scalar HSV in [0, 1] -> RGB in [0, 1] (3,)."""
    h = h % 1.0
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]


def _palette(rng) -> np.ndarray:
    """(NUM_MATERIALS, 3) float RGB in [0, 255], drawn fresh for every photo."""
    pal = np.zeros((NUM_MATERIALS, 3), np.float32)

    def colour(h, s, v):
        return np.asarray(_hsv_to_rgb(h, s, v), np.float32) * 255

    sky_kind = rng.random()
    if sky_kind < 0.55:
        pal[SKY] = colour(rng.uniform(0.55, 0.65), rng.uniform(0.2, 0.6), rng.uniform(0.7, 1.0))
    elif sky_kind < 0.85:
        pal[SKY] = colour(0, 0, rng.uniform(0.6, 0.95))
    else:
        pal[SKY] = colour(rng.uniform(0.02, 0.12), rng.uniform(0.3, 0.7), rng.uniform(0.6, 0.95))
    pal[GROUND] = colour(rng.uniform(0, 1), rng.uniform(0, 0.4), rng.uniform(0.3, 0.7))
    wall_v = rng.uniform(0.35, 0.95)
    pal[WALL] = colour(rng.uniform(0, 1), rng.uniform(0.05, 0.6), wall_v)
    dark = rng.random() < 0.8
    win_v = wall_v * rng.uniform(0.25, 0.6) if dark else min(1.0, wall_v * rng.uniform(1.2, 1.6))
    pal[WINDOW] = colour(rng.uniform(0, 1), rng.uniform(0, 0.5), win_v)
    pal[ROOF] = colour(rng.uniform(0, 1), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.8))
    pal[COLUMN] = colour(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.6, 1.0))
    pal[DOOR] = colour(rng.uniform(0, 1), rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.45))
    pal[TRIM] = colour(rng.uniform(0, 1), rng.uniform(0, 0.4), rng.uniform(0.3, 1.0))
    return pal


def _perspective_coeffs(out_pts, in_pts):
    """The 8 PIL PERSPECTIVE coefficients mapping output points to input (canvas) points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(out_pts, in_pts):
        rows.append([x, y, 1, 0, 0, 0, -x * u, -y * u])
        rows.append([0, 0, 0, x, y, 1, -x * v, -y * v])
        rhs.extend([u, v])
    return np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64))


# (viewpoint corner jitter, yaw, rotation deg, zoom range, centre offset, occluded fraction,
#  light strength) per level.
_LEVEL_PARAMS = {
    "query": (0.02, 0.05, 2.0, (1.15, 1.35), 0.03, (0.0, 0.03), 0.3),
    "easy": (0.03, 0.08, 3.0, (1.1, 1.45), 0.05, (0.0, 0.08), 0.5),
    "train": (0.06, 0.2, 6.0, (0.85, 1.6), 0.12, (0.0, 0.3), 0.8),
    "distractor": (0.06, 0.2, 6.0, (0.9, 1.6), 0.1, (0.0, 0.25), 0.8),
    "hard": (0.1, 0.3, 9.0, (0.75, 1.8), 0.15, (0.15, 0.35), 1.0),
    "junk": (0.14, 0.4, 12.0, (0.7, 2.2), 0.2, (0.6, 0.8), 1.2),
}


@dataclasses.dataclass(frozen=True)
class Photo:
    """One rendered photograph: JPEG bytes and the building's box [x1, y1, x2, y2] in it."""

    jpeg: bytes
    width: int
    height: int
    bbox: tuple
    occluded: float


def _occlude(img: Image.Image, building: np.ndarray, target: float, rng) -> float:
    """Draws occluders until about `target` of the building is covered; returns the fraction."""
    w, h = img.size
    area = max(int(building.sum()), 1)
    ys, xs = np.nonzero(building)
    if target <= 0 or xs.size == 0:
        return 0.0
    bx0, bx1, by0, by1 = xs.min(), xs.max(), ys.min(), ys.max()
    occ = Image.new("L", (w, h), 0)
    draw_occ = ImageDraw.Draw(occ)
    draw_img = ImageDraw.Draw(img)
    covered = 0.0
    for _ in range(12):
        if covered >= target:
            break
        remaining = target - covered
        kind = rng.integers(4)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        side = np.sqrt(remaining * area) * rng.uniform(0.8, 1.3)
        cx, cy = rng.uniform(bx0, bx1 + 1), rng.uniform(by0, by1 + 1)
        if kind == 0:    # tree: clustered blobs, greenish or any hue
            if rng.random() < 0.7:
                col = (int(rng.integers(20, 90)), int(rng.integers(70, 160)),
                       int(rng.integers(20, 80)))
            for _ in range(5):
                r = side * rng.uniform(0.25, 0.45)
                ox, oy = rng.normal(0, side * 0.2, 2)
                box = [cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r]
                draw_img.ellipse(box, fill=col)
                draw_occ.ellipse(box, fill=255)
        elif kind == 1:  # pole / lamp post
            pw = max(2.0, side * 0.12)
            box = [cx - pw / 2, by0 + (by1 - by0) * rng.uniform(0, 0.5), cx + pw / 2, h]
            draw_img.rectangle(box, fill=col)
            draw_occ.rectangle(box, fill=255)
        elif kind == 2:  # vehicle / hoarding along the bottom
            vw, vh = side * rng.uniform(1.2, 2.0), side * rng.uniform(0.4, 0.7)
            box = [cx - vw / 2, by1 - vh, cx + vw / 2, by1 + 2]
            draw_img.rounded_rectangle(box, radius=vh * 0.2, fill=col)
            draw_occ.rounded_rectangle(box, radius=vh * 0.2, fill=255)
        else:            # sign / person: upright rectangle
            box = [cx - side * 0.35, cy - side * 0.6, cx + side * 0.35, cy + side * 0.6]
            draw_img.rectangle(box, fill=col)
            draw_occ.rectangle(box, fill=255)
        covered = float((np.asarray(occ) > 0)[building].mean())
    return covered


def render_photo(scene: LandmarkScene, rng: np.random.Generator, level: str,
                 long_side: int, *, base_palette: np.ndarray | None = None,
                 palette_variation: float = 1.0) -> Photo:
    """Photographs `scene` at difficulty `level` (see `_LEVEL_PARAMS`); returns a `Photo`.

    The building's colours are `base_palette + palette_variation * (fresh - base_palette)`
    with a fresh random palette per photo (sky and ground always take the fresh one):
    variation 1 (or no base) repaints every photo, 0 keeps the landmark's own colours
    (illumination still changes them).
    """
    corner, yaw, rot_deg, zoom_range, offset, occ_range, light = _LEVEL_PARAMS[level]
    s = scene.material.shape[0]
    sw, sh = _SHAPES[rng.choice(len(_SHAPES), p=_SHAPE_P)]
    side = int(round(long_side * rng.uniform(0.7, 1.0)))
    w, h = max(16, int(round(side * sw))), max(16, int(round(side * sh)))

    # Canvas colours: a (materials * shade levels, 3) colour table, one gather.
    pal = _palette(rng)
    if base_palette is not None and palette_variation < 1.0:
        building = list(BUILDING_MATERIALS)  # sky and ground stay fresh: no background cue
        pal[building] = base_palette[building] + palette_variation * (
            pal[building] - base_palette[building])
    lo, hi = SHADE_RANGE
    levels = np.linspace(lo, hi, SHADE_LEVELS, dtype=np.float32)
    table = np.zeros((NUM_MATERIALS * SHADE_LEVELS, 4), np.uint8)
    table[:, :3] = np.clip(pal[:, None, :] * levels[None, :, None], 0, 255).reshape(-1, 3)
    packed = np.take(table.view(np.uint32)[:, 0], scene.index)  # RGBX packed in uint32
    canvas = Image.fromarray(packed.view(np.uint8).reshape(s, s, 4), "RGBA").convert("RGB")
    sky_low = pal[SKY] * 0.8

    # Camera: a view rectangle around the building, then viewpoint distortion.
    x0, y0, x1, y1 = scene.bbox
    bw, bh = x1 - x0, y1 - y0
    zoom = rng.uniform(*zoom_range)
    vw = zoom * max(bw, bh * w / h)
    vh = vw * h / w
    cx = (x0 + x1) / 2 + rng.uniform(-offset, offset) * bw
    cy = (y0 + y1) / 2 + rng.uniform(-offset, offset) * bh
    quad = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * [vw, vh]
    k = rng.uniform(-yaw, yaw)             # converging verticals of a side view
    quad[:, 1] *= 1 + k * np.sign(quad[:, 0])
    quad += rng.normal(0, corner, (4, 2)) * [vw, vh]
    angle = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = quad @ rot.T + [cx, cy]
    coeffs = _perspective_coeffs([(0, 0), (w, 0), (w, h), (0, h)], quad)
    fill = tuple(int(c) for c in sky_low)
    photo = canvas.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR,
                             fillcolor=fill)
    matmap = Image.fromarray(scene.material).transform(
        (w, h), Image.PERSPECTIVE, tuple(coeffs), Image.NEAREST, fillcolor=SKY)
    building = _IS_BUILDING[np.asarray(matmap)]

    # Occlusion.
    occluded = _occlude(photo, building, rng.uniform(*occ_range), rng)

    # Illumination: gain, colour cast and gamma as per-channel lookup tables; a gradient
    # shadow; sensor noise.
    gain = np.exp(rng.normal(0, 0.2 * light))
    cast = np.exp(rng.normal(0, 0.08 * light, 3))
    gamma = np.exp(rng.normal(0, 0.15 * light))
    ramp_amp = rng.uniform(0, 0.5 * light)
    theta = rng.uniform(0, 2 * np.pi)
    noise = int(rng.integers(0, 5))
    x = np.arange(256, dtype=np.float64) / 255.0
    luts = [np.clip(np.clip(x * gain * c, 0, 1) ** gamma * 255, 0, 255) for c in cast]
    photo = photo.point(np.concatenate(luts).round().astype(np.uint8).tolist())
    ramp = ((np.arange(w, dtype=np.float32) / w - 0.5)[None, :] * np.cos(theta)
            + (np.arange(h, dtype=np.float32) / h - 0.5)[:, None] * np.sin(theta))
    factor = np.maximum(1 + ramp_amp * ramp, 0)
    arr = np.asarray(photo, np.float32) * factor[..., None]
    if noise:  # luminance noise, uniform integers in [-noise, noise]
        arr += rng.integers(-noise, noise + 1, (h, w, 1), dtype=np.int16)
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    ys, xs = np.nonzero(building)
    if xs.size:
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    else:
        bbox = (0.0, 0.0, float(w), float(h))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return Photo(jpeg=buf.getvalue(), width=w, height=h, bbox=bbox, occluded=occluded)


# ---------------------------------------------------------------------------- dataset


def image_id(seed: int, landmark: int, k: int) -> str:
    """The 16-hex GLDv2-style id of training photo k of a landmark."""
    return hashlib.sha1(f"glam-synth/{seed}/{landmark}/{k}".encode()).hexdigest()[:16]


def _render_landmark_task(task: dict) -> list:
    """Renders and writes the photos of one landmark; returns [(path, record)]."""
    scene = render_scene(task["seed"], task["landmark"], task["canvas"])
    base_palette = _palette(_rng(task["seed"], 4, task["landmark"]))
    out = []
    for k, (path, level) in enumerate(task["photos"]):
        rng = _rng(task["seed"], 2, task["landmark"], k)
        photo = render_photo(scene, rng, level, task["long_side"], base_palette=base_palette,
                             palette_variation=task["palette_variation"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f, jpeg=photo.jpeg: f.write(jpeg))
        out.append({"path": path, "level": level, "bbox": photo.bbox,
                    "occluded": round(photo.occluded, 4), "size": [photo.width, photo.height]})
    return out


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    """Where `generate_synthetic_landmarks` put things and how many."""

    root: str
    train_csv: str
    train_images: int
    train_landmarks: int
    test_dir: str
    gnd_path: str
    num_queries: int
    num_database: int
    seconds: float


def _params(**kwargs) -> dict:
    return dict(sorted(kwargs.items()))


def _check_args(*, num_train_landmarks, images_per_landmark, num_test_landmarks,
                queries_per_landmark, database_per_landmark, num_distractor_landmarks,
                images_per_distractor, image_size, palette_variation, num_workers, **_):
    """Raises ValueError naming the first argument of `generate_synthetic_landmarks` out of
    range."""
    for name, value, low in (("num_train_landmarks", num_train_landmarks, 1),
                             ("images_per_landmark", images_per_landmark, 1),
                             ("num_test_landmarks", num_test_landmarks, 1),
                             ("queries_per_landmark", queries_per_landmark, 1),
                             ("num_distractor_landmarks", num_distractor_landmarks, 0),
                             ("images_per_distractor", images_per_distractor, 0),
                             ("image_size", image_size, 32), ("num_workers", num_workers, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if len(database_per_landmark) != 3 or min(database_per_landmark) < 0 or \
            sum(database_per_landmark) < 1:
        raise ValueError("database_per_landmark must be (easy, hard, junk) counts >= 0 with at "
                         f"least one photo, got {database_per_landmark!r}")
    if not 0.0 <= palette_variation <= 1.0:
        raise ValueError(f"palette_variation must be in [0, 1], got {palette_variation!r}")


def generate_synthetic_landmarks(
        root: str, *, num_train_landmarks: int = 100, images_per_landmark: int = 15,
        num_test_landmarks: int = 10, queries_per_landmark: int = 5,
        database_per_landmark: tuple = (5, 4, 3), num_distractor_landmarks: int = 20,
        images_per_distractor: int = 4, image_size: int = 224, palette_variation: float = 1.0,
        seed: int = 0, num_workers: int = 1, show_progress: bool = True) -> SyntheticSummary:
    """Writes the synthetic training set (GLDv2 layout) and test set (revisited layout).

    Args:
      root: output folder (created).
      num_train_landmarks / images_per_landmark: training classes and photos per class.
      num_test_landmarks: landmarks that get queries (disjoint from training landmarks).
      queries_per_landmark: query photos per test landmark (not in the database).
      database_per_landmark: (easy, hard, junk) database photos per test landmark.
      num_distractor_landmarks / images_per_distractor: other landmarks in the database only.
      image_size: longer photo side is image_size * U(0.7, 1.0) px.
      palette_variation: in [0, 1], how far each photo's building colours move from the
        landmark's own palette towards a fresh random one (1: every photo repainted, colour
        says nothing about identity; 0: only illumination and occluders change them).
      seed: everything follows from it; same seed, same bytes.
      num_workers: processes (spawned); 1 renders here.
      show_progress: progress bar.

    Returns:
      A `SyntheticSummary`.
    """
    _check_args(num_train_landmarks=num_train_landmarks, images_per_landmark=images_per_landmark,
                num_test_landmarks=num_test_landmarks, queries_per_landmark=queries_per_landmark,
                database_per_landmark=database_per_landmark,
                num_distractor_landmarks=num_distractor_landmarks,
                images_per_distractor=images_per_distractor, image_size=image_size,
                palette_variation=palette_variation, num_workers=num_workers)
    params = _params(num_train_landmarks=num_train_landmarks,
                     images_per_landmark=images_per_landmark,
                     num_test_landmarks=num_test_landmarks,
                     queries_per_landmark=queries_per_landmark,
                     database_per_landmark=list(database_per_landmark),
                     num_distractor_landmarks=num_distractor_landmarks,
                     images_per_distractor=images_per_distractor, image_size=image_size,
                     palette_variation=float(palette_variation), seed=seed)
    start = time.monotonic()
    canvas = int(round(1.5 * image_size))
    rng = _rng(seed, 0)
    # Sparse, distinct GLDv2-like landmark ids for the training classes.
    landmark_ids = np.sort(rng.choice(200000, size=num_train_landmarks, replace=False))
    train_dir = os.path.join(root, "train")
    test_dir = os.path.join(root, DATASET_NAME)
    jpg_dir = os.path.join(test_dir, "jpg")

    tasks = []
    train_rows = []
    for i in range(num_train_landmarks):
        ids = [image_id(seed, i, k) for k in range(images_per_landmark)]
        train_rows.append((int(landmark_ids[i]), ids))
        photos = [(os.path.join(train_dir, t[0], t[1], t[2], t + ".jpg"), "train") for t in ids]
        tasks.append({"landmark": i, "photos": photos, "kind": "train"})
    # Test landmarks follow the training ones; distractors follow those: disjoint by index.
    db_entries = []   # (landmark index, level, temporary key)
    for j in range(num_test_landmarks):
        lm = num_train_landmarks + j
        photos = [(os.path.join(jpg_dir, f"query_{j:03d}_{q}.jpg"), "query")
                  for q in range(queries_per_landmark)]
        n = 0
        for level, count in zip(("easy", "hard", "junk"), database_per_landmark):
            for _ in range(count):
                db_entries.append((lm, level, f"{lm}-{n}"))
                photos.append((f"db:{lm}-{n}", level))
                n += 1
        tasks.append({"landmark": lm, "photos": photos, "kind": "test"})
    for j in range(num_distractor_landmarks):
        lm = num_train_landmarks + num_test_landmarks + j
        photos = []
        for n in range(images_per_distractor):
            db_entries.append((lm, "distractor", f"{lm}-{n}"))
            photos.append((f"db:{lm}-{n}", "distractor"))
        tasks.append({"landmark": lm, "photos": photos, "kind": "distractor"})
    # Database names in a seeded shuffled order, so position says nothing about landmark.
    order = _rng(seed, 3).permutation(len(db_entries))
    db_name = {}
    imlist = []
    for pos, idx in enumerate(order):
        name = f"db_{pos:05d}"
        db_name[db_entries[idx][2]] = name
        imlist.append(name)
    for task in tasks:
        task["photos"] = [
            (os.path.join(jpg_dir, db_name[p[3:]] + ".jpg") if p.startswith("db:") else p, lv)
            for p, lv in task["photos"]]
        task.update(seed=seed, canvas=canvas, long_side=image_size,
                    palette_variation=float(palette_variation))

    marker = os.path.join(root, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    os.makedirs(jpg_dir, exist_ok=True)
    total = sum(len(t["photos"]) for t in tasks)
    bar = progress_lib.ProgressBar(total, unit="images", description="synthetic landmarks",
                                   enabled=show_progress)
    results = {}
    done = 0
    if num_workers == 1:
        for t in tasks:
            results[t["landmark"]] = _render_landmark_task(t)
            done += len(t["photos"])
            bar.update(done)
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_render_landmark_task, t): t for t in tasks}
            for f in concurrent.futures.as_completed(futures):
                results[futures[f]["landmark"]] = f.result()
                done += len(futures[f]["photos"])
                bar.update(done)
    bar.close()

    # Training csv (GLDv2 train_clean.csv format).
    csv_text = "landmark_id,images\n" + "".join(f"{lm_id},{' '.join(ids)}\n"
                                                 for lm_id, ids in train_rows)
    atomic_write(os.path.join(root, "train_clean.csv"),
                 lambda f: f.write(csv_text.encode("utf-8")))

    # Ground truth (revisited format).
    name_index = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    manifest_test = {}
    for task in tasks:
        lm = task["landmark"]
        for rec in results[lm]:
            name = os.path.splitext(os.path.basename(rec["path"]))[0]
            if task["kind"] != "train":
                manifest_test[name] = {"landmark": lm, "level": rec["level"],
                                       "occluded": rec["occluded"]}
        if task["kind"] != "test":
            continue
        levels = {"easy": [], "hard": [], "junk": []}
        for rec in results[lm]:
            if rec["level"] in levels:
                levels[rec["level"]].append(
                    name_index[os.path.splitext(os.path.basename(rec["path"]))[0]])
        for rec in results[lm]:
            if rec["level"] == "query":
                qimlist.append(os.path.splitext(os.path.basename(rec["path"]))[0])
                gnd.append({"bbx": [float(c) for c in rec["bbox"]],
                            **{k: np.array(sorted(v), dtype=np.int64)
                               for k, v in levels.items()}})
    gnd_path = os.path.join(test_dir, f"gnd_{DATASET_NAME}.pkl")
    atomic_write(gnd_path, lambda f: pickle.dump(
        {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=4))

    manifest = {
        "params": params,
        "train": {str(int(landmark_ids[i])): i for i in range(num_train_landmarks)},
        "test": manifest_test,
    }
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest)
    seconds = time.monotonic() - start
    summary = SyntheticSummary(
        root=root, train_csv=os.path.join(root, "train_clean.csv"),
        train_images=num_train_landmarks * images_per_landmark,
        train_landmarks=num_train_landmarks, test_dir=test_dir, gnd_path=gnd_path,
        num_queries=len(qimlist), num_database=len(imlist), seconds=seconds)
    write_json_atomic(marker, {"params": params, "summary": dataclasses.asdict(summary)})
    logging.info("synthetic landmarks in %s: %d training photos of %d landmarks, %d queries, "
                 "%d database photos (%.1f s)", root, summary.train_images,
                 num_train_landmarks, len(qimlist), len(imlist), seconds)
    return summary


def generate_if_absent(root: str, **kwargs) -> SyntheticSummary:
    """Generates the synthetic set unless `root` already holds a complete one with these args.

    Idempotent: the marker file is written last, so an interrupted generation is redone. A
    complete set generated with different arguments raises instead of being overwritten.
    Takes the keyword arguments of `generate_synthetic_landmarks`.
    """
    marker = os.path.join(root, MARKER_NAME)
    defaults = {k: v.default for k, v in _signature_defaults().items()}

    def comparable(args):
        return _params(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()
                          if k not in ("num_workers", "show_progress")})

    _check_args(**{**defaults, **kwargs})  # before the marker: a bad value fails first
    params = comparable({**defaults, **kwargs})
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            saved = json.load(f)
        # A set written before a parameter existed was generated with its default.
        saved["params"] = {**comparable(defaults), **saved["params"]}
        if saved["params"] == params:
            logging.info("synthetic landmarks already in %s", root)
            return SyntheticSummary(**saved["summary"])
        diff = sorted(k for k in params if params[k] != saved["params"].get(k))
        raise ValueError(
            f"{root} holds synthetic landmarks generated with other arguments ("
            + ", ".join(f"{k}: {saved['params'].get(k)!r} there, {params[k]!r} asked" for k in diff)
            + "); use another folder or delete it")
    return generate_synthetic_landmarks(root, **kwargs)


def _signature_defaults() -> dict:
    import inspect  # pylint: disable=g-import-not-at-top
    sig = inspect.signature(generate_synthetic_landmarks)
    return {k: p for k, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
