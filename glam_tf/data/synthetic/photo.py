"""Photographs of a `LandmarkScene`: viewpoint, light, occluders, blur, noise and JPEG.

How strong each change is depends on the photo's level (train, query, easy, hard, junk,
distractor), so the test split's easy/hard/junk labels follow from how it was photographed.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from glam_tf.data.synthetic.scene import (BUILDING_MATERIALS, NUM_MATERIALS, SHADE_LEVELS,
                                          SHADE_RANGE, SKY, LandmarkScene, draw_palette)

_IS_BUILDING = np.isin(np.arange(256), BUILDING_MATERIALS)

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
    pal = draw_palette(rng)
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
