"""Tests of the synthetic landmarks: determinism, layouts, disjointness, structure vs colour."""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glam_tf.config import DataConfig, SettingError, SyntheticConfig
from glam_tf.data import gldv2, synthetic, testsets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_train_landmarks=16, images_per_landmark=8, num_test_landmarks=3,
             queries_per_landmark=2, database_per_landmark=(3, 2, 2),
             num_distractor_landmarks=3, images_per_distractor=2, image_size=96, seed=5)


def _small(root, **changes):
    return SyntheticConfig(root=root, **{**SMALL, **changes})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    return root, synthetic.generate_synthetic_landmarks(_small(root), show_progress=False)


def _digests(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name != synthetic.MARKER_NAME:  # the marker records the run time
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _hog(image, cells=4, bins=8):
    """Unsigned gradient-orientation histograms on a 4 x 4 grid (colour-blind structure)."""
    g = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), np.float32)
    gy, gx = np.gradient(g)
    magnitude = np.hypot(gx, gy)
    b = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * bins).astype(int), bins - 1)
    cell = np.arange(64) // (64 // cells)
    index = (cell[:, None] * cells + cell[None, :]) * bins + b
    d = np.sqrt(np.bincount(index.ravel(), magnitude.ravel(), cells * cells * bins))
    return d / np.linalg.norm(d)


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    root, _ = synth
    again = str(tmp_path / "again")  # also: worker processes change nothing
    synthetic.generate_synthetic_landmarks(_small(again), num_workers=2, show_progress=False)
    assert _digests(root) == _digests(again)
    other = str(tmp_path / "other")
    synthetic.generate_synthetic_landmarks(
        _small(other, seed=6, num_train_landmarks=2, num_test_landmarks=1,
               num_distractor_landmarks=0), show_progress=False)
    assert not set(_digests(root).values()) & set(_digests(other).values())


def test_train_split_reads_as_gldv2(synth):
    root, summary = synth
    images = gldv2.read_gldv2_csv(gldv2.find_gldv2_csv(root))
    assert len(images) == 16 * 8 == summary.train_images
    assert len({im.landmark_id for im in images}) == 16
    for im in images:
        assert len(im.image_id) == 16 and int(im.image_id, 16) >= 0
        path = gldv2.gldv2_image_path(os.path.join(root, "train"), im.image_id)
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) <= 96
    shapes = {Image.open(gldv2.gldv2_image_path(os.path.join(root, "train"), im.image_id)).size
              for im in images}
    aspects = {h / w for w, h in shapes}
    assert min(aspects) < 0.67 and max(aspects) > 1.5  # spans every aspect group


def test_gnd_pickle_revisited_structure(synth):
    root, summary = synth
    with open(summary.gnd_path, "rb") as f:
        data = f.read()
    # A restricted unpickler (plain containers + numpy arrays, as the evaluation loads
    # untrusted ground truth) must be able to read it.
    allowed = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray",
               "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}
    used = set()

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            used.add((module, name))
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{module}.{name} not allowed")
            return super().find_class(module, name)

    gnd = Restricted(io.BytesIO(data)).load()
    assert used <= allowed
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert len(qimlist) == 3 * 2 == len(gnd["gnd"]) == summary.num_queries
    assert len(imlist) == 3 * 7 + 3 * 2 == summary.num_database
    assert not set(imlist) & set(qimlist)  # queries are not in the database
    with open(os.path.join(root, synthetic.MANIFEST_NAME)) as f:
        test_meta = json.load(f)["test"]
    for name in imlist + qimlist:
        assert os.path.isfile(os.path.join(root, "synth", "jpg", name + ".jpg"))
    for qname, g in zip(qimlist, gnd["gnd"]):
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        for key in ("easy", "hard", "junk"):
            assert g[key].dtype.kind == "i"
        assert [len(g["easy"]), len(g["hard"]), len(g["junk"])] == [3, 2, 2]
        landmark = test_meta[qname]["landmark"]
        positives = np.concatenate([g["easy"], g["hard"], g["junk"]])
        assert len(set(positives.tolist())) == 7
        # Exactly the database photos of the query's landmark, at their level.
        assert sorted(positives.tolist()) == sorted(
            i for i, n in enumerate(imlist) if test_meta[n]["landmark"] == landmark)
        for key in ("easy", "hard", "junk"):
            assert {test_meta[imlist[i]]["level"] for i in g[key]} == {key}
        x1, y1, x2, y2 = g["bbx"]
        assert all(isinstance(c, float) for c in g["bbx"])
        with Image.open(os.path.join(root, "synth", "jpg", qname + ".jpg")) as image:
            w, h = image.size
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) * (y2 - y1) >= 0.2 * w * h  # the building, not a speck
    occluded = {lv: np.mean([m["occluded"] for m in test_meta.values() if m["level"] == lv])
                for lv in ("query", "easy", "hard", "junk")}
    assert occluded["query"] < 0.1 and occluded["easy"] < 0.15
    assert 0.1 < occluded["hard"] < 0.5 and occluded["junk"] > 0.5


def test_train_and_test_landmarks_disjoint(synth):
    root, _ = synth
    with open(os.path.join(root, synthetic.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    train = set(manifest["train"].values())
    test = {m["landmark"] for m in manifest["test"].values()}
    assert len(train) == 16 and len(test) == 3 + 3
    assert not train & test
    # Different landmark index means a different structure, not a renamed copy.
    a = synthetic.render_scene(5, min(test), 144)
    for lm in sorted(train)[:4]:
        assert not np.array_equal(a.material, synthetic.render_scene(5, lm, 144).material)


def _train_photos(root):
    """(RGB image, landmark id) of every training photo under `root`."""
    for im in gldv2.read_gldv2_csv(os.path.join(root, "train_clean.csv")):
        with Image.open(gldv2.gldv2_image_path(os.path.join(root, "train"), im.image_id)) as f:
            yield f.convert("RGB"), im.landmark_id


def _nearest_neighbour_accuracy(features, labels):
    """Fraction of photos whose nearest other photo (L2) shows the same landmark."""
    f, labels = np.asarray(features), np.asarray(labels)
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_mean_colour_does_not_identify_a_landmark_but_structure_does(synth):
    root, _ = synth
    colours, structure, labels = [], [], []
    for image, label in _train_photos(root):
        colours.append(np.asarray(image, np.float32).mean((0, 1)))
        structure.append(_hog(image))
        labels.append(label)
    chance = 1 / 16
    by_colour = _nearest_neighbour_accuracy(colours, labels)
    by_structure = _nearest_neighbour_accuracy(structure, labels)
    assert by_colour <= 2.5 * chance, by_colour
    assert by_structure >= 2.5 * chance and by_structure >= by_colour + 0.1, by_structure


def _centre_colour_nn_accuracy(root):
    """Nearest-neighbour landmark accuracy of the mean colour of each photo's central half
    (mostly building: the camera frames it)."""
    colours, labels = [], []
    for image, label in _train_photos(root):
        a = np.asarray(image, np.float32)
        h, w = a.shape[:2]
        colours.append(a[h // 4:3 * h // 4, w // 4:3 * w // 4].mean((0, 1)))
        labels.append(label)
    return _nearest_neighbour_accuracy(colours, labels)


def test_palette_variation_zero_makes_colour_a_cue(synth, tmp_path):
    """palette_variation=0 keeps each building's own colours (illumination and occluders
    still vary them; sky and ground stay random): the building's colour then finds the
    landmark far above chance, unlike the default repainting."""
    root = str(tmp_path / "consistent")
    synthetic.generate_synthetic_landmarks(_small(root, palette_variation=0.0),
                                           show_progress=False)
    chance = 1 / 16
    consistent = _centre_colour_nn_accuracy(root)
    assert consistent >= 2.5 * chance
    assert consistent >= _centre_colour_nn_accuracy(synth[0]) + 0.08
    # The setting is recorded with the other parameters.
    with open(os.path.join(root, synthetic.MANIFEST_NAME)) as fh:
        assert json.load(fh)["params"]["palette_variation"] == 0.0
    with pytest.raises(SettingError, match=r"--palette_variation must be a number in \[0, 1\]; "
                                           r"received --palette_variation=1.5"):
        synthetic.generate_synthetic_landmarks(_small(str(tmp_path / "bad"),
                                                      palette_variation=1.5))


def test_generate_if_absent_is_idempotent(synth, tmp_path):
    root = str(tmp_path / "demo")
    config = _small(root, num_train_landmarks=2, images_per_landmark=2, num_test_landmarks=1,
                    num_distractor_landmarks=1)
    first = synthetic.generate_if_absent(config, show_progress=False)
    marker = os.path.join(root, synthetic.MARKER_NAME)
    stamp = os.stat(marker).st_mtime_ns
    assert synthetic.generate_if_absent(config) == first
    assert os.stat(marker).st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other arguments \(seed: 5 there, 6 asked\)"):
        synthetic.generate_if_absent(dataclasses.replace(config, seed=6))
    # A set from before palette_variation existed was generated with its default (1).
    with open(marker) as f:
        saved = json.load(f)
    del saved["params"]["palette_variation"]
    with open(marker, "w") as f:
        json.dump(saved, f)
    assert synthetic.generate_if_absent(config) == first
    with pytest.raises(ValueError, match=r"palette_variation: 1.0 there, 0.5 asked"):
        synthetic.generate_if_absent(dataclasses.replace(config, palette_variation=0.5))
    os.remove(marker)  # as if interrupted: generated again
    synthetic.generate_if_absent(config, show_progress=False)
    assert os.path.exists(marker)


def test_synthetic_through_converter_and_pipeline(synth, tmp_path):
    from glam_tf.data import pipeline  # pylint: disable=g-import-not-at-top

    root, _ = synth
    summary = gldv2.convert_gldv2(root, str(tmp_path / "tfr"), num_shards=2)
    assert summary.total_written == 128 and summary.num_classes == 16
    assert not summary.missing and not summary.undecodable
    config = DataConfig(summary.train_pattern, global_batch_size=8,
                                       size_scale=0.125, shuffle_buffer=64, deterministic=True)
    images, labels = next(iter(pipeline.build_train_dataset(config)))
    assert images.shape[0] == 8
    assert tuple(images.shape[1:3]) in {(h, w) for w, h in config.scaled_bucket_sizes()}
    assert set(labels.numpy().tolist()) <= set(range(16))


def test_make_synthetic_main(tmp_path):
    root = tmp_path / "cli"
    args = [sys.executable, os.path.join(REPO, "make_synthetic_main.py"), f"--root={root}",
            "--num_train_landmarks=2", "--images_per_landmark=2", "--num_test_landmarks=1",
            "--queries_per_landmark=1", "--database_per_landmark=1,1,1",
            "--num_distractor_landmarks=1", "--images_per_distractor=1", "--image_size=64"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 training photos of 2 landmarks" in result.stdout
    assert "1 queries, 4 database photos" in result.stdout
    bad = subprocess.run(args + ["--database_per_landmark=1,x"], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert bad.returncode == 2 and ("--database_per_landmark must be a comma-separated list "
                                    "like 1,2,3; received --database_per_landmark=1,x"
                                    ) in bad.stderr
    # Range errors and a set made with other flags are usage errors, not tracebacks.
    for extra, message in (("--palette_variation=1.5",
                            "--palette_variation must be a number in [0, 1]"),
                           ("--seed=3", "other arguments (seed: 0 there, 3 asked)")):
        bad = subprocess.run(args + [extra], capture_output=True, text=True, timeout=120,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr


def test_validation_split_is_held_out_and_leaves_the_test_split_unchanged(synth, tmp_path):
    """num_val_landmarks adds synth_val (landmarks of its own, distractors of its own) and
    changes no byte of the training photos or the test split."""
    root, summary = synth
    with_val = str(tmp_path / "val")
    val_summary = synthetic.generate_synthetic_landmarks(_small(with_val, num_val_landmarks=2),
                                                         show_progress=False)
    before, after = _digests(root), _digests(with_val)
    assert {k: v for k, v in after.items() if not k.startswith("synth_val")
            and k != synthetic.MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != synthetic.MANIFEST_NAME}
    assert summary.val_gnd_path == "" and summary.val_queries == 0
    assert val_summary.val_queries == 2 * 2
    val = testsets.load_revisited(with_val, synthetic.VAL_DATASET_NAME)
    assert len(val.qimlist) == 4 and len(val.imlist) == 2 * (3 + 2 + 2) + 3 * 2
    with open(os.path.join(with_val, synthetic.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    train = set(manifest["train"].values())
    test = {m["landmark"] for m in manifest["test"].values()}
    val_landmarks = {m["landmark"] for m in manifest["val"].values()}
    assert len(val_landmarks) == 2 + 3
    assert not val_landmarks & (train | test)
    # The validation ground truth points at the validation landmark's own photos.
    for query, gnd in zip(val.qimlist, val.gnd):
        owner = manifest["val"][query]["landmark"]
        for i in np.concatenate([gnd["easy"], gnd["hard"]]):
            assert manifest["val"][val.imlist[i]]["landmark"] == owner


def test_frame_scale_and_neighbours_put_the_landmark_small_among_shared_buildings(tmp_path):
    """frame_scale 2 shrinks the landmark to about half the photo's width (a quarter of the
    area); the neighbours beside it come from a pool shared by every landmark."""
    from glam_tf.data.synthetic import photo as photo_lib, scene as scene_lib, writer
    scene = scene_lib.render_scene(5, 0, 144)
    base = scene_lib.draw_palette(scene_lib.seeded_rng(5, 4, 0))

    def box_area(frame_scale, neighbours=()):
        areas = []
        for k in range(12):
            p = photo_lib.render_photo(scene, scene_lib.seeded_rng(5, 2, 0, k), "train", 96,
                                       base_palette=base, palette_variation=0.0,
                                       frame_scale=frame_scale, neighbours=neighbours)
            x0, y0, x1, y1 = p.bbox
            areas.append((x1 - x0) * (y1 - y0) / (p.width * p.height))
        return float(np.mean(areas))

    default, wide = box_area(1.0), box_area(2.0)
    assert 0.15 < wide / default < 0.4, (default, wide)
    # The world: neighbours stand beside the landmark, never on it, on their own palettes.
    task = {"seed": 5, "landmark": 0, "neighbours": 2, "clutter_pool": 3, "canvas": 144}
    neighbours = writer._neighbours(task, 0)
    assert [n.side for n in neighbours] == [-1, -1, 1, 1]
    index, material, (bx0, _, bx1, _) = photo_lib._compose_world(scene, neighbours, 2.0)
    palette = index // photo_lib._TABLE_SIZE
    landmark = np.isin(material, scene_lib.BUILDING_MATERIALS)
    assert landmark.sum() == np.isin(scene.material, scene_lib.BUILDING_MATERIALS).sum()
    assert (palette[landmark] == 0).all()
    for k, n in enumerate(neighbours, start=1):
        where = np.nonzero(palette == k)[1]
        assert where.size, k
        assert (where < bx0).all() if n.side < 0 else (where >= bx1).all()
    assert not landmark[palette > 0].any()
    # Shared pool: photos of different landmarks draw the same clutter buildings.
    ids = lambda lm: {id(n.scene) for k in range(6)  # noqa: E731
                      for n in writer._neighbours({**task, "landmark": lm}, k)}
    assert len(ids(0) | ids(1)) <= 3 and ids(0) & ids(1)


def test_street_settings_through_the_generator(synth, tmp_path):
    """frame_scale / neighbours / occlusion_scale reach every photo; bad values are named."""
    root, _ = synth
    street = str(tmp_path / "street")
    synthetic.generate_synthetic_landmarks(
        _small(street, frame_scale=2.0, neighbours=1, clutter_pool=2, occlusion_scale=2.0),
        show_progress=False)
    with open(os.path.join(street, synthetic.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["params"]["frame_scale"] == 2.0 and manifest["params"]["neighbours"] == 1
    with open(os.path.join(root, synthetic.MANIFEST_NAME)) as f:
        plain = json.load(f)
    occluded = lambda m: np.mean([v["occluded"] for v in m["test"].values()  # noqa: E731
                                  if v["level"] in ("easy", "hard")])
    assert occluded(manifest) > 1.3 * occluded(plain)
    for field, value, message in (
            ("frame_scale", 0.5, r"--frame_scale must be a number in \[1, 4\]"),
            ("neighbours", 4, r"--neighbours must be an integer in \[0, 3\]"),
            ("clutter_pool", 0, r"--clutter_pool must be a positive integer"),
            ("num_val_landmarks", -1, r"--num_val_landmarks must be an integer >= 0")):
        with pytest.raises(SettingError, match=message):
            synthetic.generate_synthetic_landmarks(_small(str(tmp_path / "bad"),
                                                          **{field: value}))


def _photos(level="train", **knobs):
    """12 photos of one building at `level` (palette kept: only the knobs change colour)."""
    from glam_tf.data.synthetic import photo as photo_lib, scene as scene_lib
    scene = scene_lib.render_scene(5, 0, 144)
    base = scene_lib.draw_palette(scene_lib.seeded_rng(5, 4, 0))
    return [photo_lib.render_photo(scene, scene_lib.seeded_rng(5, 2, 0, k), level, 96,
                                   base_palette=base, palette_variation=0.0, **knobs)
            for k in range(12)]


def _box_stats(photos):
    """Per photo: the box's mean colour (3,), its centre / photo size (2,), and the log of
    its larger side share (box width / photo width or height / height: -log zoom)."""
    colour, centre, area = [], [], []
    for p in photos:
        x0, y0, x1, y1 = p.bbox
        rgb = np.asarray(Image.open(io.BytesIO(p.jpeg)).convert("RGB"), np.float32)
        colour.append(rgb[int(y0):int(y1), int(x0):int(x1)].mean((0, 1)))
        centre.append(((x0 + x1) / 2 / p.width, (y0 + y1) / 2 / p.height))
        area.append(np.log(max((x1 - x0) / p.width, (y1 - y0) / p.height)))
    return np.array(colour), np.array(centre), np.array(area)


def test_illumination_position_and_zoom_jitter_do_what_they_say():
    """Each knob widens the spread it names over photos of one building; defaults draw the
    photos of before (no extra random numbers), and the same seed gives the same bytes."""
    plain = _photos()
    assert [p.jpeg for p in plain] == [p.jpeg for p in _photos(
        illumination=1.0, position_jitter=0.0, zoom_jitter=0.0)]
    colour, centre, _ = _box_stats(plain)
    lit = _photos(illumination=2.5)
    assert [p.jpeg for p in lit] == [p.jpeg for p in _photos(illumination=2.5)]
    assert _box_stats(lit)[0].std(0).mean() > 1.5 * colour.std(0).mean()
    moved = _box_stats(_photos(position_jitter=0.25))[1]
    assert np.abs(moved - 0.5).mean() > 2 * np.abs(centre - 0.5).mean()
    # Queries (zoom 1.15 to 1.35) frame the whole building: its side's share shows the zoom.
    framed = _box_stats(_photos("query"))[2]
    zoomed = _box_stats(_photos("query", zoom_jitter=0.6))[2]
    assert zoomed.std() > 2 * framed.std()


def test_photo_variation_settings_through_the_generator(tmp_path):
    """illumination / position_jitter / zoom_jitter reach the photos and the manifest; bad
    values are named."""
    tiny = dict(num_train_landmarks=2, images_per_landmark=2, num_test_landmarks=1,
                num_distractor_landmarks=0)
    plain, varied = str(tmp_path / "plain"), str(tmp_path / "varied")
    synthetic.generate_synthetic_landmarks(_small(plain, **tiny), show_progress=False)
    synthetic.generate_synthetic_landmarks(
        _small(varied, **tiny, illumination=2.0, position_jitter=0.2, zoom_jitter=0.3),
        show_progress=False)
    with open(os.path.join(varied, synthetic.MANIFEST_NAME)) as f:
        params = json.load(f)["params"]
    assert (params["illumination"], params["position_jitter"], params["zoom_jitter"]) == (
        2.0, 0.2, 0.3)
    a, b = _digests(plain), _digests(varied)
    photos = [k for k in a if k.endswith(".jpg")]
    assert photos and all(a[k] != b[k] for k in photos)
    for field, value, message in (
            ("illumination", 5.0, r"--illumination must be a number in \[0, 4\]"),
            ("position_jitter", 0.6, r"--position_jitter must be a number in \[0, 0.5\]"),
            ("zoom_jitter", -0.1, r"--zoom_jitter must be a number in \[0, 1\]")):
        with pytest.raises(SettingError, match=message):
            synthetic.generate_synthetic_landmarks(_small(str(tmp_path / "bad"),
                                                          **{field: value}))
