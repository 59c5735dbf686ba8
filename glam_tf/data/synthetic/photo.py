"""Photographs of a `LandmarkScene`: viewpoint, light, occluders, blur, noise and JPEG.

How strong each change is depends on the photo's level (train, query, easy, hard, junk,
distractor), so the test split's easy/hard/junk labels follow from how it was photographed.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from glam_tf.data.synthetic.scene import (BUILDING_MATERIALS, GROUND, NUM_MATERIALS,
                                          SHADE_LEVELS, SHADE_RANGE, SKY, LandmarkScene,
                                          draw_palette, shade_level)

_IS_BUILDING = np.isin(np.arange(256), BUILDING_MATERIALS)
_TABLE_SIZE = NUM_MATERIALS * SHADE_LEVELS

# Photo shapes: (width, height) relative to the longer side, and their frequency. h/w spans
# all five default aspect groups of the training pipeline.
_SHAPES = ((1.0, 0.75), (0.75, 1.0), (1.0, 1.0), (1.0, 0.625), (0.625, 1.0))
_SHAPE_P = (0.35, 0.25, 0.15, 0.15, 0.10)


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
class Neighbour:
    """A clutter building placed beside the landmark in one photo.

    Attributes:
      scene: its structure (`render_scene` of a clutter id, never a landmark's).
      base_palette: its own colours, (NUM_MATERIALS, 3).
      side: -1 left of the landmark, +1 right; several on one side stand in order outwards.
      scale: its size relative to its own canvas drawing.
      gap: the street between it and the building before it, in canvas widths.
    """

    scene: LandmarkScene
    base_palette: np.ndarray
    side: int
    scale: float
    gap: float


def _ground_row(scene: LandmarkScene) -> int:
    """Canvas row where the ground starts (column 0 is only sky and ground)."""
    return int(np.argmax(scene.material[:, 0] == GROUND))


def _compose_world(scene: LandmarkScene, neighbours, frame_scale: float):
    """The landmark's canvas inside a wider street scene.

    Returns (index, material, bbox): `index` the colour-table index per world pixel with
    the palette number (0 the landmark, sky and ground; k the k-th neighbour) in its high
    part, `material` the landmark's building materials (sky elsewhere, neighbours
    included, so masks and boxes are the landmark's), `bbox` the landmark's box in world
    pixels.
    """
    s = scene.material.shape[0]
    side_px = int(round(s * (frame_scale + 1.0)))
    # The landmark's ground line sits at 80 % of the world's height, centred horizontally.
    ox = (side_px - s) // 2
    oy = int(round(0.8 * side_px)) - _ground_row(scene)
    ground_row = oy + _ground_row(scene)
    index = np.empty((side_px, side_px), np.intp)
    # Sky brightening downwards to the horizon, as on a landmark's own canvas; even ground.
    index[:ground_row] = SKY * SHADE_LEVELS + shade_level(
        np.linspace(0.75, 1.05, ground_row))[:, None]
    index[ground_row:] = GROUND * SHADE_LEVELS + shade_level(0.85)
    material = np.full((side_px, side_px), SKY, np.uint8)
    # The world is at least twice the canvas, so the canvas lies inside it; only the
    # building is pasted (the canvas' own sky and ground would frame it: a cue).
    keep = _IS_BUILDING[scene.material]
    index[oy:oy + s, ox:ox + s][keep] = scene.index[keep]
    material[oy:oy + s, ox:ox + s][keep] = scene.material[keep]
    bx0, by0, bx1, by1 = scene.bbox
    edges = {-1: ox + bx0, 1: ox + bx1}
    for k, nb in enumerate(neighbours, start=1):
        n = nb.scene
        nx0, ny0, nx1, _ = (int(round(c)) for c in n.bbox)
        rows, cols = slice(max(ny0, 0), _ground_row(n)), slice(max(nx0, 0), max(nx1, nx0 + 1))
        tile_mat, tile_idx = n.material[rows, cols], n.index[rows, cols]
        th, tw = tile_mat.shape
        nh, nw = max(1, int(round(th * nb.scale))), max(1, int(round(tw * nb.scale)))
        ri = np.minimum((np.arange(nh) / nb.scale).astype(np.intp), th - 1)
        ci = np.minimum((np.arange(nw) / nb.scale).astype(np.intp), tw - 1)
        tile_mat, tile_idx = tile_mat[ri][:, ci], tile_idx[ri][:, ci]
        gap = int(round(nb.gap * s))
        left = int(edges[nb.side] + gap) if nb.side > 0 else int(edges[nb.side] - gap - nw)
        edges[nb.side] = left + nw if nb.side > 0 else left
        top = ground_row - nh
        wy0, wx0 = max(top, 0), max(left, 0)
        wy1, wx1 = min(top + nh, side_px), min(left + nw, side_px)
        if wy1 <= wy0 or wx1 <= wx0:
            continue
        sub_mat = tile_mat[wy0 - top:wy1 - top, wx0 - left:wx1 - left]
        sub_idx = tile_idx[wy0 - top:wy1 - top, wx0 - left:wx1 - left]
        # Only its building, and never over the landmark.
        paste = _IS_BUILDING[sub_mat] & ~_IS_BUILDING[material[wy0:wy1, wx0:wx1]]
        index[wy0:wy1, wx0:wx1][paste] = k * _TABLE_SIZE + sub_idx[paste]
    bbox = (ox + bx0, oy + by0, ox + bx1, oy + by1)
    return index, material, bbox


def _colour_table(pal: np.ndarray) -> np.ndarray:
    """(NUM_MATERIALS * SHADE_LEVELS,) uint32 RGBX colours: palette x shade levels."""
    lo, hi = SHADE_RANGE
    levels = np.linspace(lo, hi, SHADE_LEVELS, dtype=np.float32)
    table = np.zeros((_TABLE_SIZE, 4), np.uint8)
    table[:, :3] = np.clip(pal[:, None, :] * levels[None, :, None], 0, 255).reshape(-1, 3)
    return table.view(np.uint32)[:, 0]


def _vary(pal: np.ndarray, base_palette, palette_variation: float) -> np.ndarray:
    """The building colours moved from `base_palette` towards the fresh `pal` (in place)."""
    if base_palette is not None and palette_variation < 1.0:
        building = list(BUILDING_MATERIALS)  # sky and ground stay fresh: no background cue
        pal[building] = base_palette[building] + palette_variation * (
            pal[building] - base_palette[building])
    return pal


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
                 palette_variation: float = 1.0, frame_scale: float = 1.0,
                 neighbours=(), occlusion_scale: float = 1.0, illumination: float = 1.0,
                 position_jitter: float = 0.0, zoom_jitter: float = 0.0) -> Photo:
    """Photographs `scene` at difficulty `level` (see `_LEVEL_PARAMS`); returns a `Photo`.

    The building's colours are `base_palette + palette_variation * (fresh - base_palette)`
    with a fresh random palette per photo (sky and ground always take the fresh one):
    variation 1 (or no base) repaints every photo, 0 keeps the landmark's own colours
    (illumination still changes them). `frame_scale` > 1 widens the view around the
    building by that factor, in a street scene with the `neighbours` (`Neighbour`s, their
    colours varied the same way); `occlusion_scale` multiplies the occluded fraction aimed
    at; `illumination` the level's light strength (gain, colour cast, gamma, shadow);
    `zoom_jitter` z scales the view by exp(U(-z, z)); `position_jitter` j moves the view's
    centre by U(-j, j) of the view's width and height. Defaults (1, none, 1, 1, 0, 0) draw
    exactly the photo of the default framing (a jitter of 0 draws no random number).
    """
    corner, yaw, rot_deg, zoom_range, offset, occ_range, light = _LEVEL_PARAMS[level]
    light *= illumination
    sw, sh = _SHAPES[rng.choice(len(_SHAPES), p=_SHAPE_P)]
    side = int(round(long_side * rng.uniform(0.7, 1.0)))
    w, h = max(16, int(round(side * sw))), max(16, int(round(side * sh)))

    # Canvas colours: a (materials * shade levels, 3) colour table per palette, one gather.
    pal = _vary(draw_palette(rng), base_palette, palette_variation)
    if frame_scale == 1.0 and not neighbours:
        index, material, (x0, y0, x1, y1) = scene.index, scene.material, scene.bbox
        table = _colour_table(pal)
    else:
        index, material, (x0, y0, x1, y1) = _compose_world(scene, neighbours, frame_scale)
        table = np.concatenate([_colour_table(pal)] + [
            _colour_table(_vary(draw_palette(rng), nb.base_palette, palette_variation))
            for nb in neighbours])
    packed = np.take(table, index)  # RGBX packed in uint32
    canvas = Image.fromarray(packed.view(np.uint8).reshape(*index.shape, 4),
                             "RGBA").convert("RGB")
    sky_low = pal[SKY] * 0.8

    # Camera: a view rectangle around the building, then viewpoint distortion.
    bw, bh = x1 - x0, y1 - y0
    zoom = rng.uniform(*zoom_range) * frame_scale
    if zoom_jitter:
        zoom *= np.exp(rng.uniform(-zoom_jitter, zoom_jitter))
    vw = zoom * max(bw, bh * w / h)
    vh = vw * h / w
    cx = (x0 + x1) / 2 + rng.uniform(-offset, offset) * bw
    cy = (y0 + y1) / 2 + rng.uniform(-offset, offset) * bh
    if position_jitter:
        cx += rng.uniform(-position_jitter, position_jitter) * vw
        cy += rng.uniform(-position_jitter, position_jitter) * vh
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
    matmap = Image.fromarray(material).transform(
        (w, h), Image.PERSPECTIVE, tuple(coeffs), Image.NEAREST, fillcolor=SKY)
    building = _IS_BUILDING[np.asarray(matmap)]

    # Occlusion.
    occluded = _occlude(photo, building, min(0.9, rng.uniform(*occ_range) * occlusion_scale),
                        rng)

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
