"""The colour-histogram yardstick against an independent NumPy reference: the descriptor
(np.histogramdd), the central half, the query crop and the revisited scoring (cirtorch's
compute_map written the straightforward way)."""

import importlib.util
import pathlib

import numpy as np
import pytest
from PIL import Image

from helpers import ref_compute_map

from glam_tf.data import testsets
from glam_tf.eval import yardstick


def _ref_descriptor(rgb):
    hist, _ = np.histogramdd(rgb.reshape(-1, 3).astype(np.float64), bins=(8, 8, 8),
                             range=((0, 256),) * 3)
    d = np.sqrt(hist.ravel() / hist.sum())
    return d / np.linalg.norm(d)


@pytest.mark.parametrize("shape", [(7, 9), (32, 32), (1, 1), (48, 31)])
def test_descriptor_matches_histogramdd(shape):
    rng = np.random.default_rng(sum(shape))
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb[0, 0] = (31, 32, 255)  # bin edges: 31 -> bin 0, 32 -> bin 1, 255 -> bin 7
    d = yardstick.histogram_descriptor(rgb)
    assert d.shape == (512,) and d.dtype == np.float32
    np.testing.assert_allclose(d, _ref_descriptor(rgb), rtol=1e-6, atol=1e-7)
    assert abs(float(d @ d) - 1.0) < 1e-6


def test_central_half_is_the_middle_half_of_each_side():
    a = np.arange(9 * 10).reshape(9, 10)
    c = yardstick.central_half(a)
    np.testing.assert_array_equal(c, a[2:7, 2:8])  # rows 9 // 4 .. 9 - 2, cols 2 .. 8
    assert yardstick.central_half(np.zeros((96, 64, 3))).shape == (48, 32, 3)
    with pytest.raises(ValueError, match=r"non-empty uint8 \(H, W, 3\) image, got float64"):
        yardstick.histogram_descriptor(np.zeros((4, 4, 3)))


def _write_set(root):
    """A revisited split "synth": 4 queries (boxes around one coloured block), 12 database
    photos of blocks on noise (PNG bytes under the split's .jpg names): colour decides the ranking, so it is not flat."""
    rng = np.random.default_rng(3)
    colours = rng.choice(8, (4, 3)) * 32 + 16  # bin centres: +-8 stays in the bin
    imlist, qimlist, gnd = [], [], []
    for i in range(12):
        img = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        img[10:30, 12:38] = colours[i % 4] + rng.integers(-8, 9, 3)
        name = f"db_{i:05d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            testsets.revisited_image_path(str(root), "synth", name), format="PNG")
        imlist.append(name)
    for q in range(4):
        img = rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)
        img[5:35, 8:40] = colours[q]
        name = f"query_{q:03d}_0"
        Image.fromarray(img).save(testsets.revisited_image_path(str(root), "synth", name),
                                  format="PNG")
        qimlist.append(name)
        db = [i for i in range(12) if i % 4 == q]
        gnd.append({"bbx": [7.6, 4.5, 40.2, 35.0], "easy": np.array(db[:1]),
                    "hard": np.array(db[1:2]), "junk": np.array(db[2:])})
    testsets.write_revisited_gnd(testsets.revisited_gnd_path(str(root), "synth"),
                                 imlist, qimlist, gnd)
    return imlist, qimlist, gnd


def _load_bench():
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "yardstick.py"
    spec = importlib.util.spec_from_file_location("yardstick_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_matches_the_reference_protocol(tmp_path, capsys):
    (tmp_path / "synth" / "jpg").mkdir(parents=True)
    imlist, qimlist, gnd = _write_set(tmp_path)
    results = yardstick.evaluate(str(tmp_path), "synth")
    path = lambda n: testsets.revisited_image_path(str(tmp_path), "synth", n)  # noqa: E731
    db = [np.asarray(Image.open(path(n)).convert("RGB")) for n in imlist]
    queries = []
    for n, g in zip(qimlist, gnd):
        x1, y1, x2, y2 = (int(round(v)) for v in g["bbx"])
        queries.append(np.asarray(Image.open(path(n)).convert("RGB"))[y1:y2, x1:x2])
    for region, cut in (("whole", lambda a: a),
                        ("central", lambda a: a[a.shape[0] // 4:a.shape[0] - a.shape[0] // 4,
                                                a.shape[1] // 4:a.shape[1] - a.shape[1] // 4])):
        qd = np.stack([_ref_descriptor(cut(a)) for a in queries])
        dd = np.stack([_ref_descriptor(cut(a)) for a in db])
        ranking = np.argsort(-(dd @ qd.T), axis=0, kind="stable")
        setups = {"easy": lambda g: (g["easy"], np.concatenate([g["hard"], g["junk"]])),
                  "medium": lambda g: (np.concatenate([g["easy"], g["hard"]]), g["junk"]),
                  "hard": lambda g: (g["hard"], np.concatenate([g["easy"], g["junk"]]))}
        for setup, split in setups.items():
            ref = [dict(zip(("ok", "junk"), split(g))) for g in gnd]
            expected, _, _ = ref_compute_map(ranking, ref)
            assert results[region][setup] == pytest.approx(100 * expected, abs=1e-6), (
                region, setup)
    # The block fills the central half: colour names the landmark there.
    assert results["central"]["medium"] > 90, results
    # bench/yardstick.py prints the same figures as Markdown rows; bad arguments refused.
    bench = _load_bench()
    assert bench.main([f"--root={tmp_path}", "--splits=synth"]) == 0
    rows = [line.split(" | ")[:5] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["| synth", yardstick.LABELS[region]]
                    + [f"{results[region][s]:.2f}" for s in ("easy", "medium", "hard")]
                    for region in yardstick.REGIONS]
    for argv in ([f"--root={tmp_path}", "--splits=synth,test"],
                 [f"--root={tmp_path / 'none'}"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2
    lines = yardstick.format_lines(results).splitlines()
    assert lines[0].startswith("Colour histogram, whole photo (no learning): mAP E ")
    assert lines[1].startswith("Colour histogram, central half (no learning): mAP E ")


def test_an_unreadable_photo_is_named(tmp_path):
    (tmp_path / "synth" / "jpg").mkdir(parents=True)
    imlist, _, _ = _write_set(tmp_path)
    bad = tmp_path / "synth" / "jpg" / f"{imlist[3]}.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"{imlist[3]}.jpg: cannot be read for the colour "
                                         "histogram"):
        yardstick.evaluate(str(tmp_path), "synth")
