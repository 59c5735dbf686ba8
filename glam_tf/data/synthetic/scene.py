"""A landmark's structure: procedural facades drawn as a material map with a shade texture.

The structure (outline, roof, windows, door, texture) is what identifies a landmark; colour
comes per photo from `draw_palette`, so it lives here beside the materials it colours.
"""

import dataclasses

import numpy as np
from PIL import Image

# Material ids of the scene map.
SKY, GROUND, WALL, WINDOW, ROOF, COLUMN, DOOR, TRIM = range(8)
NUM_MATERIALS = 8
BUILDING_MATERIALS = (WALL, WINDOW, ROOF, COLUMN, DOOR, TRIM)
SHADE_LEVELS = 64
SHADE_RANGE = (0.5, 1.1)


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


def seeded_rng(seed: int, *keys) -> np.random.Generator:
    """A generator seeded by (seed, keys...): independent of process and call order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


def shade_level(shade):
    """Quantised shade level(s), intp in [0, SHADE_LEVELS): the low part of a colour index."""
    lo, hi = SHADE_RANGE
    return np.clip(np.round((np.asarray(shade) - lo) / (hi - lo) * (SHADE_LEVELS - 1)),
                   0, SHADE_LEVELS - 1).astype(np.intp)


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
    rng = seeded_rng(seed, 1, landmark)
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
    index = mat.astype(np.intp) * SHADE_LEVELS + shade_level(shade)
    return LandmarkScene(material=mat, shade=shade, bbox=bbox_px, index=index)



def _hsv_to_rgb(h, s, v):
    """Scalar HSV in [0, 1] -> RGB in [0, 1] (3,)."""
    h = h % 1.0
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]


def draw_palette(rng) -> np.ndarray:
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
