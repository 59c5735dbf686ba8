"""Evaluation output: the paper-layout table, the JSON record, and top-10 pictures.

The picture marks each of a query's top 10 by its status under the Medium setup (the
original protocol's only one): positive (green), junk / ignored (yellow), negative (red),
undecodable database image (grey); the query crop has a blue frame. Written as a PNG grid
(Pillow) with a title and, under the grid, the legend of the frame colours (`LEGEND`), and
an HTML page with JPEG thumbnails and the same legend. Each result is labelled
`#<rank>  score <score>` (`result_label`): rank and score cannot read as one number.
"""

import html
import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from glam_tf import files
from glam_tf.eval import extract, metrics

_SHORT = {"roxford5k": "ROxf", "rparis6k": "RPar", "oxford5k": "Oxf5k", "paris6k": "Par6k",
          "synth": "Synth", "synth_val": "SynthVal"}
COLORS = {"positive": (0, 170, 0), "junk": (235, 195, 0), "negative": (215, 0, 0),
          "invalid": (128, 128, 128), "query": (30, 90, 220)}
# The frame colours' meaning, in the order of the legend drawn under the pictures.
LEGEND = (("query", "query"), ("positive", "same landmark (positive)"),
          ("junk", "junk (ignored)"), ("negative", "other landmark (negative)"),
          ("invalid", "undecodable image"))
THUMB = 128     # side of the square a picture's image is contained in
_BORDER = 6
_LABEL_H = 18   # text line under each cell (and a little air before the next row)
TITLE_H = 24    # the title line above a picture's grid
LEGEND_H = 26   # the legend line under it
_TEXT = (0, 0, 0)


def _fmt(v):
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def dataset_label(dataset, distractors):
    """Short name as in the paper's tables, e.g. `ROxf+1M`."""
    return _SHORT.get(dataset, dataset) + ("+1M" if distractors else "")


_REFINEMENT_TAGS = {"database_augmentation": "DBA", "query_expansion": "QE",
                    "rerank": "rerank"}


def refinement_label(refinement):
    """e.g. `+DBA+QE+rerank` for the refinements that ran."""
    return "".join("+" + _REFINEMENT_TAGS.get(r, r) for r in refinement["ran"])


def format_table(results):
    """The paper's layout: mAP and mP@10 for Medium and Hard (then Easy), or Oxf/Par mAP.

    With search-time refinements, one row without them and one with them (side by side),
    then what ran with its parameters and time per query.
    """
    label = dataset_label(results["dataset"], results["distractors"])
    refinement = results.get("refinement")
    rows = [(label, results["metrics"])]
    if refinement:
        rows = [(label, refinement["metrics_without"]),
                (label + " " + refinement_label(refinement), results["metrics"])]
    width = max(10, *(len(name) for name, _ in rows))
    m = results["metrics"]
    if results["protocol"] == "original":
        header = f"| {'dataset':<{width}} | {'mAP':>6} |"
        lines = [header, "|" + "-" * (width + 2) + "|" + "-" * 8 + "|"]
        lines += [f"| {name:<{width}} | {_fmt(r[metrics.ORIGINAL_SETUP]['mAP'])} |"
                  for name, r in rows]
    else:
        cols = [("medium", "mAP"), ("hard", "mAP"), ("medium", "mP@10"), ("hard", "mP@10"),
                ("easy", "mAP"), ("easy", "mP@10")]
        names = [f"{s[0].upper()} {k}" for s, k in cols]
        header = f"| {'dataset':<{width}} | " + " | ".join(f"{n:>8}" for n in names) + " |"
        lines = [header, "|" + "-" * (width + 2) + ("|" + "-" * 10) * len(cols) + "|"]
        lines += [f"| {name:<{width}} | " + " | ".join(f"{_fmt(r[s][k]):>8}" for s, k in cols)
                  + " |" for name, r in rows]
        lines.append("  mP@1/5/10 " + "; ".join(
            f"{s}: {_fmt(m[s]['mP@1']).strip()}/{_fmt(m[s]['mP@5']).strip()}/"
            f"{_fmt(m[s]['mP@10']).strip()}" for s in metrics.SETUPS))
    if refinement:
        params = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                           for name, p in refinement["parameters"].items())
        times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in
                          refinement["ms_per_query"].items())
        lines.append(f"  refinements ({params}); per query: {times}"
                     + (f"; DBA {refinement['seconds']['database_augmentation']:.2f} s "
                        "for the database" if "database_augmentation" in refinement["seconds"]
                        else ""))
    c = results["counts"]
    lines.append(f"  queries {c['queries_evaluated']}/{c['queries']} evaluated, database "
                 f"{c['database']} images ({c['distractors']} distractors), undecodable: "
                 f"{c['undecodable_queries']} queries, {c['undecodable_database']} database")
    return "\n".join(lines)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _nan_to_none(o):
    if isinstance(o, float) and not math.isfinite(o):  # NaN AP, -inf score: JSON null
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def write_json(results, path):
    """Writes the results dict (NaN and infinities -> null) to `path`."""
    files.makedirs(files.dirname(files.absolute(path)))
    text = json.dumps(_nan_to_none(results), indent=1, default=_json_default)
    files.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def result_status(gnd_query, index, valid=None):
    """Status of database image `index` for one query under the Medium setup."""
    if valid is not None and not valid[index]:
        return "invalid"
    pos, ign = metrics.setup_ground_truth(gnd_query, "medium")
    if index in set(pos.tolist()):
        return "positive"
    if index in set(ign.tolist()):
        return "junk"
    return "negative"


def cell_size():
    """(width, height) of one picture cell: the framed square and a text line under it."""
    side = THUMB + 2 * _BORDER
    return side, side + _LABEL_H


def frame(image, color):
    """`image` (at most THUMB square, not resized) in a `color` frame, centred on a white
    square of cell_size()[0]."""
    side = cell_size()[0]
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    framed = Image.new("RGB", (image.width + 2 * _BORDER, image.height + 2 * _BORDER), color)
    framed.paste(image, (_BORDER, _BORDER))
    canvas.paste(framed, ((side - framed.width) // 2, (side - framed.height) // 2))
    return canvas


def font(size: int = 11):
    """Pillow's bundled scalable font at `size` px (the same on every machine)."""
    return ImageFont.load_default(size=size)


def fit(draw, text: str, width: float, size: int = 11) -> str:
    """`text`, cut with "..." where it would be wider than `width` px at `size`."""
    f = font(size)
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "...", font=f) > width:
        text = text[:-1]
    return text + "..."


def result_label(rank: int, score: float) -> str:
    """The text under a result: `#3  score 0.823` (never `#30.823`)."""
    return f"#{rank}  score {score:.3f}"


def draw_title(draw, text: str, width: int) -> None:
    """`text` on the TITLE_H line at the top of a picture `width` px wide."""
    draw.text((6, 4), fit(draw, text, width - 12, 14), fill=_TEXT, font=font(14))


def legend_entries() -> list:
    """[(colour, words)] of the frame legend, in drawing order."""
    return [(COLORS[key], words) for key, words in LEGEND]


def draw_legend(draw, x: int, y: int) -> int:
    """The frame legend on one line from (x, y): "frame:" then a framed swatch and its
    words per status. Returns the x where it ends."""
    f = font(11)
    draw.text((x, y + 3), "frame:", fill=_TEXT, font=f)
    x += int(draw.textlength("frame: ", font=f)) + 4
    for colour, words in legend_entries():
        draw.rectangle((x, y + 2, x + 13, y + 15), outline=colour, width=4)
        x += 18
        draw.text((x, y + 3), words, fill=_TEXT, font=f)
        x += int(draw.textlength(words, font=f)) + 14
    return x


def legend_width() -> int:
    """Width in px of the line draw_legend draws."""
    return draw_legend(ImageDraw.Draw(Image.new("RGB", (1, 1))), 0, 0)
def save_image(image, path, image_format, **options):
    """Writes the PIL `image` to `path` in `image_format` ("PNG", "JPEG"), atomically."""
    files.atomic_write(path, lambda f: image.save(f, format=image_format, **options))


def _thumb(image, color):
    return frame(ImageOps.contain(image, (THUMB, THUMB), Image.BILINEAR), color)


def _open_rgb(path, box=None):
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as im:
            im = im.convert("RGB")
            return im.crop(extract.pil_box(box, *im.size)) if box is not None else im
    except (OSError, SyntaxError, ValueError, extract.UndecodableImage):
        return Image.new("RGB", (THUMB, THUMB), COLORS["invalid"])


def write_visualization(entries, out_dir, *, title, num=10):
    """Top-`num` pictures for chosen queries: `<out_dir>/top{num}.png` and `.html`.

    Args:
        entries: per query a dict with `query` (name), `query_path`, `box`, and `results`:
            list of dicts with `id`, `path`, `score`, `status` (see COLORS).
        out_dir: folder for the PNG, the HTML page and its thumbnails (`thumbs/`).

    Returns:
        (png_path, html_path).
    """
    thumbs_dir = files.join(out_dir, "thumbs")
    files.makedirs(thumbs_dir)
    cell_w, cell_h = cell_size()
    width = max(cell_w * (num + 1), legend_width() + 12)
    grid = Image.new("RGB", (width, TITLE_H + cell_h * max(1, len(entries)) + LEGEND_H),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw_title(draw, title, width)
    rows_html = []
    for r, e in enumerate(entries):
        y = TITLE_H + r * cell_h
        q = _thumb(_open_rgb(e["query_path"], e.get("box")), COLORS["query"])
        grid.paste(q, (0, y))
        draw.text((2, y + cell_w), fit(draw, e["query"], cell_w - 4), fill=_TEXT,
                  font=font())
        q_file = f"q{r:03d}_query.jpg"
        save_image(q, files.join(thumbs_dir, q_file), "JPEG", quality=90)
        cells = [f'<td><img src="thumbs/{q_file}"><br><b>{html.escape(e["query"])}</b></td>']
        for k, res in enumerate(e["results"][:num]):
            t = _thumb(_open_rgb(res["path"]), COLORS[res["status"]])
            grid.paste(t, ((k + 1) * cell_w, y))
            draw.text(((k + 1) * cell_w + 2, y + cell_w), result_label(k + 1, res["score"]),
                      fill=_TEXT, font=font())
            f_name = f"q{r:03d}_r{k + 1:02d}.jpg"
            save_image(t, files.join(thumbs_dir, f_name), "JPEG", quality=90)
            cells.append(f'<td><img src="thumbs/{f_name}"><br>{k + 1}. '
                         f'{html.escape(res["id"])}<br>{res["status"]} {res["score"]:.3f}</td>')
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    draw_legend(draw, 6, grid.height - LEGEND_H + 4)
    png = files.join(out_dir, f"top{num}.png")
    save_image(grid, png, "PNG")
    legend = "frame: " + " ".join(f'<span style="color:rgb{c}">&#9632; {html.escape(w)}</span>'
                                  for c, w in legend_entries())
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h2>{html.escape(title)}</h2><p>{legend}</p>"
            f"<table style='font-size:11px'>{''.join(rows_html)}</table></body></html>")
    page_path = files.join(out_dir, f"top{num}.html")
    files.write_text_atomic(page_path, page)
    return png, page_path
