"""--visualize_attention: GLAM's spatial attention maps drawn over the images.

The maps are the GLAM layer's own (`attention()` of its local and global spatial
sublayers, called here on the backbone output), reduced as documented (G_s: mean over the
output positions, or the centre's column); what is drawn before colouring is the map over
its own range, bilinearly resized; the PNG holds exactly those overlays in a grid of the
documented size, beside top10.png. A SavedModel, a baseline model and a missing
--visualize are refused with a message.
"""

import json
import pathlib
import re

import keras
import numpy as np
import pytest
from PIL import Image

from glam_tf.config import EvalConfig, SettingError
from glam_tf.data import testsets
from glam_tf.eval import attention_vis, evaluator, extract, models, report
from glam_tf.model import ModelConfig
from helpers import MAX_SIZE, fake_backend, write_tiny_revisited
from keras_helpers import tiny_descriptor_model


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return tiny_descriptor_model(ModelConfig(variant="global+local", reduced_channels=4,
                                             embedding_dim=8))


def _image(seed, shape=(48, 64, 3)):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _layer_maps(model, image):
    """Reference: the GLAM sublayers' own attention() on the backbone output."""
    f = model.get_layer("backbone")(model.get_layer("preprocess")(
        keras.ops.convert_to_tensor(image[None].astype(np.float32))), training=False)
    glam = model.get_layer("glam")
    local = keras.ops.convert_to_numpy(glam.local_spatial.attention(f))[0, :, :, 0]
    a = keras.ops.convert_to_numpy(glam.global_spatial.attention(f))[0]
    return local, a, (int(f.shape[1]), int(f.shape[2]))


def test_maps_are_the_layers_attention(model):
    image = _image(0)
    local, a, (h, w) = _layer_maps(model, image)
    assert (h, w) == (12, 16)
    np.testing.assert_allclose(a.sum(axis=0), 1.0, rtol=1e-5)     # softmax over m
    maps = attention_vis.spatial_attention(model, image)
    np.testing.assert_allclose(maps["local"], local, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["global"], a.mean(axis=1).reshape(h, w), rtol=1e-5,
                               atol=1e-9)
    assert abs(maps["global"].sum() - 1.0) < 1e-5
    center = attention_vis.spatial_attention(model, image, position="center")
    np.testing.assert_allclose(center["global"], a[:, 6 * w + 8].reshape(h, w),
                               rtol=1e-5, atol=1e-9)
    assert not np.allclose(center["global"], maps["global"])


def test_heatmap_values_are_the_map_over_its_range():
    m = np.array([[0.2, 0.4, 0.3], [0.6, 0.2, 0.5]])
    same = attention_vis.heatmap_values(m, (3, 2))          # (W, H): no resampling
    np.testing.assert_allclose(same, (m - 0.2) / 0.4, atol=1e-6)
    big = attention_vis.heatmap_values(m, (9, 6))
    assert big.shape == (6, 9) and big.min() >= 0.0 and big.max() <= 1.0
    # Bilinear upsampling by 3 keeps each cell's value at its centre pixel.
    np.testing.assert_allclose(big[1::3, 1::3], (m - 0.2) / 0.4, atol=1e-5)
    assert not attention_vis.heatmap_values(np.full((2, 2), 0.7), (4, 4)).any()
    colours = attention_vis.colorize(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(colours, [[68, 1, 84], [253, 231, 37]])
    blend = attention_vis.overlay(np.zeros((1, 2, 3), np.uint8), np.array([[0.0, 1.0]]))
    np.testing.assert_array_equal(blend, [[[34, 0, 42], [126, 116, 18]]])


def test_png_grid_beside_top10_holds_the_overlays(tmp_path, model):
    write_tiny_revisited(tmp_path / "data", distractors=False)
    backend = models.from_keras_model(model, scales=(1.0,), max_image_size=MAX_SIZE)
    assert backend.keras_model is model
    config = EvalConfig(dataset="roxford5k", data_root=str(tmp_path / "data"),
                        output_dir=str(tmp_path / "out"), max_image_size=MAX_SIZE,
                        scales=(1.0,), visualize=("q0", "1"), visualize_attention=True)
    results = evaluator.run_evaluation(config, backend=backend, print_table=False)
    png = results["outputs"]["attention_png"]
    assert png == str(tmp_path / "out" / "vis-roxford5k" / "attention.png")
    assert (tmp_path / "out" / "vis-roxford5k" / "top10.png").is_file()
    with Image.open(png) as im:
        grid = np.asarray(im.convert("RGB"))
    assert (grid.shape[1], grid.shape[0]) == attention_vis.grid_size(2, 2)
    cell_w, cell_h = report.cell_size()
    # the title, 2 queries x 3 rows of cells, the colour bar and the legend; the row
    # headers' column and 6 cells (or the legend's width, if wider)
    assert grid.shape[0] == (report.TITLE_H + 2 * 3 * cell_h + attention_vis.COLOR_BAR_H
                             + report.LEGEND_H)
    assert grid.shape[1] == max(attention_vis.HEADER_W + 6 * cell_w, report.legend_width() + 12)

    # Query q0 (a crop, at the evaluation's client resize): image, local and global rows.
    ts = testsets.load_testset(str(tmp_path / "data"), "roxford5k")
    item = extract.ImageItem("q0", ts.query_path("q0"), tuple(ts.gnd[0]["bbx"]))
    size, _ = extract.target_size(*extract.read_size(item.path), item.box, MAX_SIZE,
                                  backend.min_side())
    image = extract.load_image(item, size)
    local, a, (h, w) = _layer_maps(model, image)
    maps = {"local": local, "global": a.mean(axis=1).reshape(h, w)}
    thumb = attention_vis.thumbnail(image)
    for row, name in enumerate(("image", "local", "global")):
        drawn = (np.asarray(thumb) if name == "image" else attention_vis.overlay(
            np.asarray(thumb), attention_vis.heatmap_values(maps[name], thumb.size)))
        expected = np.asarray(report.frame(Image.fromarray(drawn), report.COLORS["query"]))
        x, y = attention_vis.cell_origin(0, row, 0, 2)
        cell = grid[y:y + cell_w, x:x + cell_w].astype(int)
        # Maps recomputed here may differ from the drawn ones in float rounding only.
        assert np.abs(cell - expected).max() <= 1, (name, np.abs(cell - expected).max())


def test_refusals(tmp_path, model):
    with pytest.raises(SettingError, match="--visualize_attention draws the --visualize"):
        EvalConfig(dataset="roxford5k", data_root="d", output_dir="o", train_dir="t",
                   visualize_attention=True).validate(check_model=False)
    with pytest.raises(SettingError, match="not the SavedModel.*--train_dir"):
        EvalConfig(dataset="roxford5k", data_root="d", output_dir="o", model="m",
                   visualize=("0",), visualize_attention=True).validate(check_model=False)
    write_tiny_revisited(tmp_path / "data", distractors=False)
    config = EvalConfig(dataset="roxford5k", data_root=str(tmp_path / "data"),
                        output_dir=str(tmp_path / "out"), max_image_size=MAX_SIZE,
                        visualize=("0",), visualize_attention=True)
    with pytest.raises(ValueError, match="needs the Keras model; the fake back-end"):
        evaluator.run_evaluation(config, backend=fake_backend())
    baseline = tiny_descriptor_model(ModelConfig(variant="baseline", embedding_dim=8))
    with pytest.raises(attention_vis.NoAttentionError, match="no GLAM module"):
        attention_vis.check_model(baseline)
    channel = tiny_descriptor_model(ModelConfig(variant="global-channel", embedding_dim=8))
    with pytest.raises(attention_vis.NoAttentionError, match="channel attention only"):
        attention_vis.check_model(channel)
    local = tiny_descriptor_model(ModelConfig(variant="local", reduced_channels=4,
                                              embedding_dim=8))
    assert attention_vis.check_model(local) == ("local",)


def test_labels_headers_and_legend_say_what_they_show():
    """Words a reader needs without the docs; rank and score, name and range apart."""
    assert report.result_label(1, 0.8234) == "#1  score 0.823"
    assert report.result_label(10, 0.5) == "#10  score 0.500"
    assert attention_vis.map_label(np.array([[-63.54, 2.0], [171.2, 0.0]])) == (
        "min -63.5  max 171")
    assert attention_vis.row_header("local") == (
        "local spatial attention", "A_s^l (eq. 2)", "per position")
    assert attention_vis.row_header("global", position="mean")[0] == "global spatial attention"
    assert "centre" in " ".join(attention_vis.row_header("global", position="center"))
    assert attention_vis.row_header("image", query="q7", top=5) == (
        "query q7", "and its top 5,", "as the model saw them")
    # The legend: every status the pictures frame, in the colour the frame has.
    assert report.legend_entries() == [
        ((30, 90, 220), "query"), ((0, 170, 0), "same landmark (positive)"),
        ((235, 195, 0), "junk (ignored)"), ((215, 0, 0), "other landmark (negative)"),
        ((128, 128, 128), "undecodable image")]
    assert {key for key, _ in report.LEGEND} == set(report.COLORS)


def test_the_docs_colour_key_matches_the_code():
    """The guides name each frame colour as the code draws it (junk is yellow)."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    names = {(0, 170, 0): "green", (235, 195, 0): "yellow", (215, 0, 0): "red",
             (128, 128, 128): "grey", (30, 90, 220): "blue"}
    key = re.search(r"the query blue, positives green,\s+junk yellow, negatives red, "
                    r"undecodable images grey", text)
    assert key, "docs/evaluation.md lost its colour key"
    assert [names[report.COLORS[k]] for k in ("query", "positive", "junk", "negative",
                                               "invalid")] == [
        "blue", "green", "yellow", "red", "grey"]


def test_top10_png_has_title_rows_and_legend(tmp_path):
    """top10.png: the title line, one row per query, the legend line under them, and the
    legend's swatches in the frame colours."""
    for name, colour in (("q.jpg", (90, 90, 90)), ("a.jpg", (200, 200, 200))):
        Image.new("RGB", (60, 40), colour).save(tmp_path / name)
    entries = [{"query": "q", "query_path": str(tmp_path / "q.jpg"), "box": None,
                "results": [{"id": "a", "path": str(tmp_path / "a.jpg"), "score": 0.5,
                             "status": status} for status in ("positive", "junk")]}]
    png, page = report.write_visualization(entries, str(tmp_path / "vis"), title="T", num=2)
    with Image.open(png) as im:
        grid = np.asarray(im.convert("RGB"))
    cell_w, cell_h = report.cell_size()
    assert grid.shape[0] == report.TITLE_H + cell_h + report.LEGEND_H
    legend = grid[-report.LEGEND_H:]
    for colour, _ in report.legend_entries():
        assert (legend == colour).all(axis=-1).any(), colour
    assert "junk (ignored)" in pathlib.Path(page).read_text()


def test_spread_counts_the_positions_each_column_attends_to():
    # Columns n of a[m, n] (softmax over m): one-hot, uniform over 4, and (0.5, 0.5, 0, 0).
    a = np.array([[1.0, 0.25, 0.5], [0.0, 0.25, 0.5], [0.0, 0.25, 0.0], [0.0, 0.25, 0.0]])
    got = attention_vis.spread(a)
    assert got["positions"] == 4
    np.testing.assert_allclose(got["top_weight"], (1.0 + 0.25 + 0.5) / 3)
    np.testing.assert_allclose(got["effective_positions"], (1.0 + 4.0 + 2.0) / 3)
    # A model without global spatial attention has no spread; its ranges are still there.
    local = tiny_descriptor_model(ModelConfig(variant="local", reduced_channels=4,
                                              embedding_dim=8))
    ranges, spread = attention_vis.attention_statistics(local, [_image(2)])
    assert spread == {} and set(ranges) == {"local_channel", "local_spatial"}


def test_map_ranges_are_the_layers_maps_over_the_queries(tmp_path, model):
    # Recorded with a Keras model's results (the ablation reads them at step 0 and at the
    # end): each map's min and max over the first queries as the evaluation sees them,
    # against the sublayers' own attention() on those images.
    write_tiny_revisited(tmp_path / "data", distractors=False)
    backend = models.from_keras_model(model, scales=(1.0,), max_image_size=MAX_SIZE)
    config = EvalConfig(dataset="roxford5k", data_root=str(tmp_path / "data"),
                        output_dir=str(tmp_path / "out"), max_image_size=MAX_SIZE,
                        scales=(1.0,))
    results = evaluator.run_evaluation(config, backend=backend, print_table=False)
    ranges = results["attention_ranges"]
    ts = testsets.load_testset(str(tmp_path / "data"), "roxford5k")
    glam = model.get_layer("glam")
    want, want_spread, used = {}, [], 0
    for q in range(min(evaluator.RANGE_QUERIES, len(ts.qimlist))):
        item = extract.ImageItem(ts.qimlist[q], ts.query_path(ts.qimlist[q]),
                                 tuple(ts.gnd[q]["bbx"]))
        try:  # the tiny set holds an undecodable query: left out, as by the evaluation
            size, _ = extract.target_size(*extract.read_size(item.path), item.box, MAX_SIZE,
                                          backend.min_side())
            image = extract.load_image(item, size)
        except extract.UndecodableImage:
            continue
        used += 1
        f = model.get_layer("backbone")(model.get_layer("preprocess")(
            keras.ops.convert_to_tensor(image[None].astype(np.float32))), training=False)
        for name in attention_vis.RANGE_MAPS:
            a = keras.ops.convert_to_numpy(getattr(glam, name).attention(f))
            lo, hi = want.get(name, (np.inf, -np.inf))
            want[name] = (min(lo, a.min()), max(hi, a.max()))
        want_spread.append(attention_vis.spread(
            keras.ops.convert_to_numpy(glam.global_spatial.attention(f))[0]))
    assert ranges["queries"] == used == 2
    assert set(ranges["maps"]) == set(attention_vis.RANGE_MAPS)
    spread = ranges["global_spatial_spread"]
    assert spread["images"] == 2
    for key in ("positions", "top_weight", "effective_positions"):
        np.testing.assert_allclose(spread[key], np.mean([s[key] for s in want_spread]),
                                   rtol=1e-5, err_msg=key)
    for name, (lo, hi) in want.items():
        np.testing.assert_allclose(ranges["maps"][name], [lo, hi], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    saved = json.loads(pathlib.Path(results["outputs"]["json"]).read_text())
    assert saved["attention_ranges"] == ranges
    # A model without GLAM records none.
    baseline = tiny_descriptor_model(ModelConfig(variant="baseline", embedding_dim=8))
    assert attention_vis.map_ranges(baseline, [_image(1)]) == {}
    config = EvalConfig(dataset="roxford5k", data_root=str(tmp_path / "data"),
                        output_dir=str(tmp_path / "out2"), max_image_size=MAX_SIZE,
                        scales=(1.0,))
    plain = evaluator.run_evaluation(
        config, backend=models.from_keras_model(baseline, scales=(1.0,),
                                                max_image_size=MAX_SIZE),
        print_table=False)
    assert "attention_ranges" not in plain
