"""Attention maps people can look at: GLAM's spatial attention overlaid on the images.

`spatial_attention(model, image)` runs the descriptor model's own layers ("preprocess",
"backbone", "glam") on one image and returns the 2-D spatial maps the GLAM module itself
returns with `return_attention=True`:

- "local": A_s^l (eq. 2's local spatial attention), `(h, w)` over conv5's grid.
- "global": from G_s `(hw, hw)` (eq. 6), a[m, n] = weight of position m in the output at
  position n (softmax over m): with position "mean" the mean over n (how much each
  position is attended, on average), with "center" the column of the centre position n.

`heatmap_values` is what is drawn before colouring: the map scaled to [0, 1] over its own
minimum and maximum (a constant map is all zeros) and resized bilinearly to the picture;
`overlay` blends its `colorize`d version with the image. `write_attention_visualization`
draws one row block per query: the query and its top results as images, then one row per
map, as a PNG grid beside the top-10 picture (glam_tf.eval.report), with a title, a header
in words at the left of every row (`row_header`), each map's range under it
(`map_label`: `min -63.5  max 171`) and, under the grid, the colour bar (dark blue = a
map's minimum, yellow = its maximum) and the legend of the frame colours.
"""

from __future__ import annotations


import numpy as np
from PIL import Image, ImageDraw, ImageOps

from glam_tf import files
from glam_tf.config.eval import ATTENTION_POSITIONS
from glam_tf.eval import report

MAPS = ("local", "global")
MAP_LABELS = {"local": "A_s^l", "global": "G_s"}
# What each row shows, in words (the left column of the picture), by map and position.
ROW_HEADERS = {
    "image": ("query {query}", "and its top {top},", "as the model saw them"),
    "local": ("local spatial attention", "A_s^l (eq. 2)", "per position"),
    ("global", "mean"): ("global spatial attention", "G_s (eq. 6): how much each",
                         "position is attended (mean)"),
    ("global", "center"): ("global spatial attention", "G_s (eq. 6): what the centre",
                           "position attends to"),
}
COLOR_BAR = ("colour: each map over its own range (under it)", "minimum", "maximum")
TOP = 5        # results drawn per query (after the query itself)
HEADER_W = 180  # the row headers' column
COLOR_BAR_H = 34  # the colour bar's line under the grid
ALPHA = 0.5    # weight of the heatmap colour in the overlay
# A perceptually ordered colour scale (dark blue -> teal -> yellow, after viridis),
# interpolated linearly between these anchors into a 256-entry table.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                     [253, 231, 37]], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)),
                           _ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


class NoAttentionError(ValueError):
    """The model has no spatial attention to draw (baseline or channel-only variant)."""


def has_glam(model) -> bool:
    """Whether `model` (build_descriptor_model's layout) has a GLAM module (not 'baseline')."""
    return "glam" in {layer.name for layer in model.layers}


def _glam_outputs(model, image):
    """(conv5 features F (1, h, w, c), the GLAM layer's dict of attention maps) of one image."""
    import keras  # pylint: disable=import-outside-toplevel

    x = keras.ops.convert_to_tensor(np.asarray(image, np.float32)[None])
    f = model.get_layer("backbone")(model.get_layer("preprocess")(x), training=False)
    _, maps = model.get_layer("glam")(f, return_attention=True)
    return f, maps


def _glam_layer(model):
    if not has_glam(model):
        raise NoAttentionError(
            f"Model {model.name!r} has no GLAM module (variant 'baseline'): there is no "
            "attention map to draw. Leave --visualize_attention off for this model.")
    glam = model.get_layer("glam")
    if glam.local_spatial is None and glam.global_spatial is None:
        raise NoAttentionError(
            f"Model {model.name!r} (variant {glam.variant!r}) has channel attention only: "
            "there is no spatial map to draw. Leave --visualize_attention off.")
    return glam


# The attention maps of the GLAM layer's `return_attention=True` outputs whose ranges
# `map_ranges` reports (GLAM_SPEC eqs. 1, 2, 4, 5).
RANGE_MAPS = ("local_channel", "local_spatial", "global_channel", "global_spatial")


def map_ranges(model, images) -> dict:
    """{map: [min, max]} over `images` of each attention map the model's variant has
    (RANGE_MAPS), straight from the GLAM layer: whether a map still sits at its
    initialisation (the spatial outputs start at zero) or has grown unbounded (docs/ablation.md).
    {} for a model without a GLAM module.

    Args:
        model: a descriptor model of build_descriptor_model's layout.
        images: uint8 or float `(H, W, 3)` RGB images in [0, 255], as served.
    """
    return attention_statistics(model, images)[0]


def spread(a) -> dict:
    """How many positions each output position of G_s attends to, from a `(hw, hw)`
    (a[m, n], softmax over m; eq. 6): the mean over n of the largest weight max_m a[m, n]
    and of the effective number of positions exp(-sum_m a[m, n] log a[m, n]) (1 for a
    one-hot column, hw for a uniform one). A range of [0, 1] alone cannot tell one
    saturated column from all of them saturated."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(a > 0, a * np.log(a), 0.0)
    return {"positions": int(a.shape[0]), "top_weight": float(a.max(axis=0).mean()),
            "effective_positions": float(np.exp(-plogp.sum(axis=0)).mean())}


def attention_statistics(model, images) -> tuple:
    """(`map_ranges`' dict, the global spatial map's `spread` averaged over `images`:
    {"images", "positions" (mean hw), "top_weight", "effective_positions"}, or {} when the
    variant has no global spatial attention), from one pass over `images`."""
    import keras  # pylint: disable=import-outside-toplevel

    if not has_glam(model):
        return {}, {}
    low, high, spreads = {}, {}, []
    for image in images:
        _, maps = _glam_outputs(model, image)
        for name in RANGE_MAPS:
            if name in maps:
                a = keras.ops.convert_to_numpy(maps[name])
                low[name] = min(low.get(name, np.inf), float(np.min(a)))
                high[name] = max(high.get(name, -np.inf), float(np.max(a)))
                if name == "global_spatial":
                    spreads.append(spread(a[0]))
    ranges = {name: [low[name], high[name]] for name in RANGE_MAPS if name in low}
    if not spreads:
        return ranges, {}
    return ranges, {"images": len(spreads), **{
        key: float(np.mean([s[key] for s in spreads]))
        for key in ("positions", "top_weight", "effective_positions")}}


def check_model(model) -> tuple:
    """The maps `model` can show (subset of MAPS); NoAttentionError if none."""
    glam = _glam_layer(model)
    return tuple(m for m, layer in (("local", glam.local_spatial),
                                    ("global", glam.global_spatial)) if layer is not None)


def global_map(a, height: int, width: int, position: str = "mean") -> np.ndarray:
    """One (h, w) map from G_s a `(hw, hw)`, a[m, n], softmax over m.

    position "mean": mean over the output positions n; "center": column n of the centre
    cell (row h // 2, column w // 2). Both sum to 1 over the h * w positions m.
    """
    if position not in ATTENTION_POSITIONS:
        raise ValueError(f"position must be one of {ATTENTION_POSITIONS}; received "
                         f"{position!r}.")
    a = np.asarray(a, dtype=np.float64)
    column = a.mean(axis=1) if position == "mean" else a[:, (height // 2) * width + width // 2]
    return column.reshape(height, width)


def spatial_attention(model, image, *, position: str = "mean") -> dict:
    """{"local": (h, w), "global": (h, w)} (those the variant has) for one image.

    Args:
        model: a descriptor model of build_descriptor_model's layout (layers
            "preprocess", "backbone", "glam").
        image: uint8 or float `(H, W, 3)` RGB in [0, 255], as the serving signatures take it.
        position: how the (hw, hw) global map becomes one map (`global_map`).

    Returns:
        float64 maps over conv5's grid, straight from the GLAM layer's
        `return_attention=True` outputs ("local_spatial" (1, h, w, 1), "global_spatial"
        (1, hw, hw)).
    """
    import keras  # pylint: disable=import-outside-toplevel

    _glam_layer(model)
    f, maps = _glam_outputs(model, image)
    h, w = int(f.shape[1]), int(f.shape[2])
    out = {}
    if "local_spatial" in maps:
        out["local"] = np.asarray(keras.ops.convert_to_numpy(maps["local_spatial"]),
                                  np.float64)[0, :, :, 0]
    if "global_spatial" in maps:
        a = np.asarray(keras.ops.convert_to_numpy(maps["global_spatial"]))[0]
        out["global"] = global_map(a, h, w, position)
    return out


def heatmap_values(attention, size) -> np.ndarray:
    """What is drawn for a map: float32 `(H, W)` in [0, 1] for a picture of `size` (W, H).

    The map is scaled to [0, 1] over its own range (a constant map gives zeros), then
    resized bilinearly (Pillow, float mode) and clipped to [0, 1].
    """
    m = np.asarray(attention, dtype=np.float64)
    low, high = float(m.min()), float(m.max())
    scaled = (m - low) / (high - low) if high > low else np.zeros_like(m)
    resized = Image.fromarray(scaled.astype(np.float32), mode="F").resize(
        tuple(size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def colorize(values) -> np.ndarray:
    """uint8 `(H, W, 3)` colours of values in [0, 1] (256-entry table, nearest entry)."""
    index = np.clip(np.rint(np.asarray(values, np.float64) * 255), 0, 255).astype(np.int64)
    return _LUT[index]


def overlay(image, values, alpha: float = ALPHA) -> np.ndarray:
    """uint8 `(H, W, 3)`: (1 - alpha) * image + alpha * colorize(values), rounded."""
    blend = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * colorize(values)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def thumbnail(image) -> Image.Image:
    """The image as drawn: contained in report's thumbnail square (aspect ratio kept)."""
    return ImageOps.contain(Image.fromarray(np.asarray(image, np.uint8)),
                            (report.THUMB, report.THUMB), Image.BILINEAR)


def panels(image, maps: dict) -> dict:
    """{"image": thumb, "local": overlay, "global": overlay} as uint8 arrays."""
    thumb = thumbnail(image)
    out = {"image": np.asarray(thumb)}
    for name in MAPS:
        if name in maps:
            out[name] = overlay(out["image"], heatmap_values(maps[name], thumb.size))
    return out


def map_label(attention) -> str:
    """Cell text under a map: its raw range (each map is drawn over its own range)."""
    m = np.asarray(attention)
    return f"min {m.min():.3g}  max {m.max():.3g}"


def row_header(name: str, *, query: str = "", top: int = TOP,
               position: str = "mean") -> tuple:
    """The lines at the left of a row: what the row shows, in words."""
    lines = ROW_HEADERS[name if name != "global" else (name, position)]
    return tuple(line.format(query=query, top=top) for line in lines)


def grid_size(num_queries: int, num_maps: int, top: int = TOP) -> tuple:
    """(width, height) of the PNG: the header column and (1 + top) cells across; the title,
    (1 + num_maps) rows per query, the colour bar and the legend down."""
    cell_w, cell_h = report.cell_size()
    width = max(HEADER_W + cell_w * (top + 1), report.legend_width() + 12)
    return width, (report.TITLE_H + cell_h * (1 + num_maps) * max(1, num_queries)
                   + COLOR_BAR_H + report.LEGEND_H)


def cell_origin(query_row: int, panel_row: int, column: int, num_maps: int) -> tuple:
    """(x, y) of the top-left corner of a cell's frame."""
    cell_w, cell_h = report.cell_size()
    return (HEADER_W + column * cell_w,
            report.TITLE_H + (query_row * (1 + num_maps) + panel_row) * cell_h)


def _draw_color_bar(draw, x: int, y: int) -> None:
    caption, low, high = COLOR_BAR
    f = report.font(11)
    draw.text((x, y + 2), caption, fill=(0, 0, 0), font=f)
    x0 = x + int(draw.textlength(caption, font=f)) + 12
    draw.text((x0, y + 2), low, fill=(0, 0, 0), font=f)
    x1 = x0 + int(draw.textlength(low, font=f)) + 6
    for i, colour in enumerate(_LUT):
        draw.line((x1 + i, y + 2, x1 + i, y + 16), fill=tuple(int(c) for c in colour))
    draw.text((x1 + len(_LUT) + 6, y + 2), high, fill=(0, 0, 0), font=f)


def write_attention_visualization(entries, out_dir, *, map_names, top: int = TOP,
                                  title: str = "", position: str = "mean") -> str:
    """Writes `<out_dir>/attention.png`; returns its path.

    Args:
        entries: per query a dict with `query` (name) and `images`: the query first, then
            its top results, each a dict with `label`, `status` (report.COLORS), `image`
            (uint8 (H, W, 3), what the model saw) and `maps` (`spatial_attention`).
        map_names: the maps drawn (rows under each query's images), from MAPS.
        top: results per query.
        title: the line above the grid.
        position: how the global maps were made from G_s (`global_map`), for the headers.
    """
    cell_w, cell_h = report.cell_size()
    grid = Image.new("RGB", grid_size(len(entries), len(map_names), top), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    report.draw_title(draw, title or "GLAM spatial attention", grid.width)
    f = report.font(11)
    for r, entry in enumerate(entries):
        if r:  # a rule between two queries' blocks
            _, y = cell_origin(r, 0, 0, len(map_names))
            draw.line((0, y - 1, grid.width, y - 1), fill=(160, 160, 160))
        for p, name in enumerate(("image",) + tuple(map_names)):
            _, y = cell_origin(r, p, 0, len(map_names))
            lines = row_header(name, query=entry["query"], top=top, position=position)
            for k, line in enumerate(lines):
                draw.text((6, y + 40 + 15 * k), report.fit(draw, line, HEADER_W - 12),
                          fill=(0, 0, 0), font=f)
        for c, item in enumerate(entry["images"][:top + 1]):
            drawn = panels(item["image"], item["maps"])
            color = report.COLORS["query" if c == 0 else item["status"]]
            for p, name in enumerate(("image",) + tuple(map_names)):
                x, y = cell_origin(r, p, c, len(map_names))
                grid.paste(report.frame(Image.fromarray(drawn[name]), color), (x, y))
                text = item["label"] if name == "image" else map_label(item["maps"][name])
                draw.text((x + 2, y + cell_w), report.fit(draw, text, cell_w - 4),
                          fill=(0, 0, 0), font=f)
    footer = grid.height - COLOR_BAR_H - report.LEGEND_H
    _draw_color_bar(draw, 6, footer + 8)
    report.draw_legend(draw, 6, grid.height - report.LEGEND_H + 4)
    files.makedirs(out_dir)
    path = files.join(out_dir, "attention.png")
    report.save_image(grid, path, "PNG")
    return path
