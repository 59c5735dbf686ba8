"""Test-set loaders: revisited pickles through the restricted unpickler, distractors,
and the original Oxford5k / Paris6k ground-truth text files (the real ones)."""

import os
import pickle

import numpy as np
import pytest

from glam_tf import safe_pickle
from glam_tf.data import testsets


def _write_revisited(root, name="roxford5k", *, protocol=4):
    """A tiny revisited-format set: 6 database images, 2 queries (files are not decoded)."""
    jpg = root / name / "jpg"
    jpg.mkdir(parents=True)
    imlist = [f"img_{i}" for i in range(6)]
    qimlist = ["q_0", "q_1"]
    for n in imlist + qimlist:
        (jpg / f"{n}.jpg").write_bytes(b"")
    gnd = [{"bbx": [1.0, 2.0, 30.5, 40.0], "easy": np.array([0, 1]), "hard": np.array([2]),
            "junk": np.array([5])},
           {"bbx": np.array([0.0, 0.0, 10.0, 10.0]), "easy": [3], "hard": np.array([], int),
            "junk": np.array([4], dtype=np.int32)}]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=protocol)
    return imlist, qimlist


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_load_revisited_all_pickle_protocols(tmp_path, protocol):
    imlist, qimlist = _write_revisited(tmp_path, protocol=protocol)
    ts = testsets.load_revisited(str(tmp_path), "roxford5k")
    assert ts.imlist == imlist and ts.qimlist == qimlist and ts.protocol == "revisited"
    assert ts.gnd[0]["bbx"] == [1.0, 2.0, 30.5, 40.0]
    assert ts.gnd[1]["bbx"] == [0.0, 0.0, 10.0, 10.0]
    np.testing.assert_array_equal(ts.gnd[0]["easy"], [0, 1])
    np.testing.assert_array_equal(ts.gnd[1]["hard"], [])
    assert all(g[k].dtype == np.int64 for g in ts.gnd for k in ("easy", "hard", "junk"))
    assert ts.image_path("img_3") == str(tmp_path / "roxford5k" / "jpg" / "img_3.jpg")
    assert ts.query_path("q_1") == str(tmp_path / "roxford5k" / "jpg" / "q_1.jpg")
    assert ts.num_database == 6 and ts.database_ids() == imlist


def test_old_numpy_module_names_load(tmp_path):
    # pickles written by numpy < 2 name numpy.core.multiarray; numpy 2 calls it numpy._core
    obj = {"a": np.arange(3), "s": np.float64(2.5)}
    data = pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray",
                                                 b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    out = safe_pickle.safe_load_pickle(str(path))
    np.testing.assert_array_equal(out["a"], [0, 1, 2])
    assert out["s"] == 2.5


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "roxford5k" / "jpg").mkdir(parents=True)
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(target)]}))
    with pytest.raises(safe_pickle.UnsafePickleError) as err:
        testsets.load_revisited(str(tmp_path), "roxford5k")
    assert str(path) in str(err.value)
    assert "system" in str(err.value) and "refused" in str(err.value)
    assert not target.exists()
    # other code-running globals are refused too
    for payload in (pickle.dumps(_Evil(target), protocol=0),
                    pickle.dumps(pickle.loads)):
        path.write_bytes(payload)
        with pytest.raises(safe_pickle.UnsafePickleError, match="refused"):
            safe_pickle.safe_load_pickle(str(path))
    assert not target.exists()


class _Call:
    """Pickles as `fn(*args)` (with `state` applied by BUILD when given), without running it."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _nested_shared_list(depth):
    """[[...], [...]] with both halves the same object: tiny pickled, 2**depth as text."""
    node = []
    for _ in range(depth):
        node = [node, node]
    return node


_AMPLIFIERS = {
    # A few dozen bytes each; unbounded, each allocated (and filled) 2**34 bytes or more.
    "bytearray_of_a_size": _Call(bytearray, (2**34,)),
    "bytes_of_a_size": _Call(bytes, (2**34,)),
    "object_array_of_a_shape": _Call(np._core.multiarray._reconstruct,
                                     (np.ndarray, (2**31,), np.dtype("O"))),
    "str_of_shared_references": _Call(str, (_nested_shared_list(40),)),
    "array_state_larger_than_its_data": _Call(     # numpy dereferenced past the list: SIGSEGV
        np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
        (1, (2**27,), np.dtype("O"), False, [1, 2])),
}


@pytest.mark.parametrize("case", sorted(_AMPLIFIERS))
@pytest.mark.parametrize("protocol", [2, 5])
def test_pickle_that_sizes_memory_is_refused(tmp_path, case, protocol):
    data = pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_AMPLIFIERS[case]]},
                        protocol=protocol)
    assert len(data) < 2000
    path = tmp_path / "gnd.pkl"
    path.write_bytes(data)
    with pytest.raises(safe_pickle.UnsafePickleError, match="refused") as err:
        safe_pickle.safe_load_pickle(str(path))
    assert str(path) in str(err.value)


def test_many_small_allocations_share_one_budget(tmp_path):
    # Each bytearray(2**20) is in budget alone; 64 of them (64 MiB from a small file) are not.
    data = pickle.dumps([_Call(bytearray, (2**20,)) for _ in range(64)], protocol=2)
    path = tmp_path / "gnd.pkl"
    path.write_bytes(data)
    with pytest.raises(safe_pickle.UnsafePickleError, match="over its budget"):
        safe_pickle.safe_load_pickle(str(path))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_large_honest_pickle_loads_within_budget(tmp_path, protocol):
    # Arrays, bytes and sets whose data is in the file load whatever their size.
    obj = {"a": np.arange(3_000_000, dtype=np.int64), "b": b"x" * 100_000,
           "ba": bytearray(b"y" * 1000), "set": {1, 2}, "c": 2j,
           "o": np.array([None, "s", 3], dtype=object), "f": np.float32(1.5)}
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_pickle.safe_load_pickle(str(path))
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"] == obj["b"] and out["ba"] == obj["ba"] and out["set"] == {1, 2}
    assert out["c"] == 2j and list(out["o"]) == [None, "s", 3] and out["f"] == 1.5


def test_bad_ground_truth_is_reported(tmp_path):
    _write_revisited(tmp_path)
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    cfg = {"imlist": ["a"], "qimlist": ["q"],
           "gnd": [{"bbx": None, "easy": [3], "hard": [], "junk": []}]}
    path.write_bytes(pickle.dumps(cfg))
    with pytest.raises(ValueError, match=r"gnd\[0\]\['easy'\]: has indices outside \[0, 1\)"):
        testsets.load_revisited(str(tmp_path), "roxford5k")
    path.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(ValueError, match="expected a dict with keys"):
        testsets.load_revisited(str(tmp_path), "roxford5k")
    path.write_bytes(b"garbage")
    with pytest.raises(pickle.UnpicklingError, match="not a readable ground-truth pickle"):
        testsets.load_revisited(str(tmp_path), "roxford5k")


def test_distractors_follow_the_test_set(tmp_path):
    imlist, _ = _write_revisited(tmp_path, "rparis6k")
    d = tmp_path / "revisitop1m"
    (d / "jpg" / "a" / "b").mkdir(parents=True)
    (d / "revisitop1m.txt").write_text("a/b/x1.jpg\na/b/x2.jpg\n\n")
    ts = testsets.load_revisited(str(tmp_path), "rparis6k", distractors_root=str(tmp_path))
    assert ts.distractors == ["a/b/x1.jpg", "a/b/x2.jpg"]
    assert ts.num_database == 8 and ts.database_ids()[6:] == ts.distractors
    assert ts.database_paths()[7] == str(d / "jpg" / "a" / "b" / "x2.jpg")
    assert ts.database_paths()[0] == ts.image_path(imlist[0])


def test_missing_files_listed_in_one_error(tmp_path):
    with pytest.raises(testsets.MissingDataError) as err:
        testsets.load_revisited(str(tmp_path), "roxford5k", distractors_root=str(tmp_path))
    msg = str(err.value)
    assert "4 required" in msg
    for part in ("roxford5k/jpg", "gnd_roxford5k.pkl", "revisitop1m.txt",
                 "revisitop1m/jpg", "http://cmp.felk.cvut.cz/revisitop/"):
        assert part in msg
    with pytest.raises(testsets.MissingDataError) as err:
        testsets.load_original(str(tmp_path), "paris6k")
    assert "paris6k/jpg" in str(err.value) and "gt_files" in str(err.value)
    assert "robots.ox.ac.uk/~vgg/data/parisbuildings" in str(err.value)
    with pytest.raises(ValueError, match="unknown test set 'holidays'"):
        testsets.load_testset(str(tmp_path), "holidays")


def _fake_original_images(root, name, gt_dir, *, nested):
    """Empty files for every image the real ground truth names (plus two extra)."""
    names = set()
    for e in testsets.parse_original_gt(str(gt_dir), name):
        names.update([e["name"], *e["good"], *e["ok"], *e["junk"]])
    names.update(["extra_1", "extra_2"])
    jpg = root / name / "jpg"
    for n in names:
        folder = jpg / "paris" / n.split("_")[1] if nested and n.startswith("paris_") else jpg
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n}.jpg").write_bytes(b"")
    return names


@pytest.mark.parametrize("name,gt,prefix_free,nested",
                         [("oxford5k", "oxford5k_gt_files", False, False),
                          ("paris6k", "paris6k_gt_files", True, True)])
def test_original_real_ground_truth(tmp_path, shared_data, name, gt, prefix_free, nested):
    gt_dir = shared_data / gt
    names = _fake_original_images(tmp_path, name, gt_dir, nested=nested)
    ts = testsets.load_original(str(tmp_path), name, gt_dir=str(gt_dir))
    assert ts.protocol == "original" and len(ts.qimlist) == 55 and len(ts.gnd) == 55
    assert sorted(ts.imlist) == ts.imlist and set(ts.imlist) == names
    assert not any(q.startswith("oxc1_") for q in ts.qimlist)
    landmarks = {q.rsplit("_", 1)[0] for q in ts.qimlist}
    raw = testsets.parse_original_gt(str(gt_dir), name)
    assert len({e["query_id"].rsplit("_", 1)[0] for e in raw}) == 11
    if name == "paris6k":
        assert all(not e["good"] for e in raw)  # Paris lists its positives in _ok.txt only
    else:
        assert all(e["good"] for e in raw)
        assert len(landmarks) > 1
    index = {n: i for i, n in enumerate(ts.imlist)}
    for e, g, q in zip(raw, ts.gnd, ts.qimlist):
        assert q == e["name"] and q in index
        np.testing.assert_array_equal(g["easy"], sorted(index[n] for n in e["good"] + e["ok"]))
        np.testing.assert_array_equal(g["junk"], sorted(index[n] for n in e["junk"]))
        assert g["hard"].size == 0 and g["easy"].size > 0
        assert np.intersect1d(g["easy"], g["junk"]).size == 0
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2
        assert os.path.isfile(ts.query_path(q))  # also through Paris's sub-folders
    first = raw[0]
    if name == "oxford5k":
        assert first["query_id"] == "all_souls_1" and first["name"] == "all_souls_000013"
        assert first["bbx"] == [136.5, 34.1, 648.5, 955.7]
    else:
        assert first["query_id"] == "defense_1" and first["name"] == "paris_defense_000605"
        assert ts.query_path(first["name"]).endswith(
            os.path.join("jpg", "paris", "defense", "paris_defense_000605.jpg"))


def test_original_missing_images_listed(tmp_path, shared_data):
    gt_dir = shared_data / "oxford5k_gt_files"
    (tmp_path / "oxford5k" / "jpg").mkdir(parents=True)
    (tmp_path / "oxford5k" / "jpg" / "all_souls_000013.jpg").write_bytes(b"")
    with pytest.raises(testsets.MissingDataError, match=r"image\(s\) named by the ground "
                       r"truth: all_souls_000000, .* \.\.\..*oxbuildings"):
        testsets.load_original(str(tmp_path), "oxford5k", gt_dir=str(gt_dir))


def test_synthetic_split_loads(tmp_path):
    synthetic = pytest.importorskip("glam_tf.data.synthetic")
    from glam_tf.config import SyntheticConfig  # pylint: disable=import-outside-toplevel

    synthetic.generate_synthetic_landmarks(SyntheticConfig(
        root=str(tmp_path), num_train_landmarks=1, images_per_landmark=1, num_test_landmarks=2,
        queries_per_landmark=2, database_per_landmark=(2, 1, 1), num_distractor_landmarks=1,
        images_per_distractor=2, image_size=48), show_progress=False)
    ts = testsets.load_revisited(str(tmp_path), "synth")
    assert len(ts.qimlist) == 4 and len(ts.imlist) == 2 * 4 + 2
    for q, g in zip(ts.qimlist, ts.gnd):
        assert os.path.isfile(ts.query_path(q)) and len(g["bbx"]) == 4
        assert (g["easy"].size, g["hard"].size, g["junk"].size) == (2, 1, 1)
    assert all(os.path.isfile(p) for p in ts.database_paths())


# ------------------------------------------------------------------ ground-truth meaning

def _good_cfg():
    return {"imlist": [f"img_{i}" for i in range(6)], "qimlist": ["q_0", "q_1"],
            "gnd": [{"bbx": [1.0, 2.0, 30.5, 40.0], "easy": np.array([0, 1]),
                     "hard": np.array([2]), "junk": np.array([5])},
                    {"bbx": [0.0, 0.0, 10.0, 10.0], "easy": [3], "hard": [], "junk": [4]}]}


def _edit(change):
    cfg = _good_cfg()
    change(cfg)
    return cfg


def _set_box(q, box):
    return lambda cfg: cfg["gnd"][q].update(bbx=box)


# case -> (change, entry named, rule quoted)
MEANING_CASES = {
    "imlist_one_string": (lambda c: c.update(imlist="img_0"), "imlist",
                          "must be a list of image names, got a str"),
    "qimlist_one_string": (lambda c: c.update(qimlist="q_0q_1"), "qimlist",
                           "must be a list of image names, got a str"),
    "duplicate_name": (lambda c: c["imlist"].__setitem__(4, "img_1"), "imlist[4] 'img_1'",
                       "duplicate of imlist[1] (names must be unique)"),
    "duplicate_query": (lambda c: c.update(qimlist=["q_0", "q_0"]), "qimlist[1] 'q_0'",
                        "duplicate of qimlist[0]"),
    "escaping_name": (lambda c: c["imlist"].__setitem__(2, "../../outside/secret"),
                      "imlist[2] '../../outside/secret'", "must be a relative name inside"),
    "absolute_name": (lambda c: c["qimlist"].__setitem__(0, "/etc/passwd"),
                      "qimlist[0] '/etc/passwd'", "no absolute path, no '..'"),
    "empty_name": (lambda c: c["imlist"].__setitem__(0, ""), "imlist[0]",
                   "must be a non-empty name"),
    "not_a_name": (lambda c: c["imlist"].__setitem__(0, 7), "imlist[0]",
                   "must be a non-empty name, got 7"),
    "gnd_dict": (lambda c: c.update(gnd={"q_0": c["gnd"][0], "q_1": c["gnd"][1]}), "gnd",
                 "must be a list with one entry per query, got a dict"),
    "gnd_count": (lambda c: c["gnd"].pop(), "gnd", "1 entries for 2 queries"),
    "gnd_key_missing": (lambda c: c["gnd"][1].pop("hard"), "gnd[1]",
                        "must be a dict with keys ['bbx', 'easy', 'hard', 'junk']"),
    "gnd_entry_not_dict": (lambda c: c["gnd"].__setitem__(0, [1, 2]), "gnd[0]",
                           "got list"),
    "index_out_of_range": (lambda c: c["gnd"][0].update(junk=[6]), "gnd[0]['junk']",
                           r"has indices outside [0, 6)"),
    "index_negative": (lambda c: c["gnd"][1].update(easy=[-1]), "gnd[1]['easy']",
                       "has indices outside [0, 6)"),
    "index_not_integer": (lambda c: c["gnd"][1].update(easy=[1.5]), "gnd[1]['easy']",
                          "must hold integer indices into imlist, got float64"),
    "box_three_numbers": (_set_box(0, [1.0, 2.0, 3.0]), "gnd[0]['bbx']",
                          "must be four finite numbers"),
    "box_nan": (_set_box(0, [1.0, float("nan"), 3.0, 4.0]), "gnd[0]['bbx']",
                "must be four finite numbers"),
    "box_not_numbers": (_set_box(1, ["a", "b", "c", "d"]), "gnd[1]['bbx']",
                        "must be four numbers"),
    "box_inverted": (_set_box(0, [30.0, 2.0, 1.0, 40.0]), "gnd[0]['bbx']",
                     "must have 0 <= x1 < x2 and 0 <= y1 < y2"),
    "box_negative": (_set_box(1, [-3.0, 0.0, 10.0, 10.0]), "gnd[1]['bbx']",
                     "must have 0 <= x1 < x2"),
    "box_outside_image": (_set_box(1, [0.0, 0.0, 50.0, 21.5]), "gnd[1]['bbx']",
                          "reaches outside the 40x20 query image"),
}


@pytest.mark.parametrize("case", sorted(MEANING_CASES))
def test_ground_truth_that_means_nothing_is_refused_in_one_line(case, tmp_path):
    _write_revisited(tmp_path)
    # q_1 is a real 40x20 image: its box is checked against that size
    from PIL import Image  # noqa: PLC0415

    Image.new("RGB", (40, 20)).save(tmp_path / "roxford5k" / "jpg" / "q_1.jpg")
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    change, entry, rule = MEANING_CASES[case]
    path.write_bytes(pickle.dumps(_edit(change), protocol=4))
    with pytest.raises(testsets.GroundTruthError) as info:
        testsets.load_revisited(str(tmp_path), "roxford5k")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {entry}: "), message
    assert rule in message, message


def test_good_ground_truth_still_loads_with_a_box_on_the_border(tmp_path):
    _write_revisited(tmp_path)
    from PIL import Image  # noqa: PLC0415

    Image.new("RGB", (40, 20)).save(tmp_path / "roxford5k" / "jpg" / "q_1.jpg")
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(_edit(_set_box(1, [0.0, 0.0, 40.0, 20.5])), protocol=4))
    ts = testsets.load_revisited(str(tmp_path), "roxford5k")
    assert ts.gnd[1]["bbx"] == [0.0, 0.0, 40.0, 20.5]
    assert ts.imlist == _good_cfg()["imlist"]


def test_distractor_lines_must_stay_inside_their_folder(tmp_path):
    _write_revisited(tmp_path, "rparis6k")
    d = tmp_path / "revisitop1m"
    (d / "jpg").mkdir(parents=True)
    (d / "revisitop1m.txt").write_text("0/00/x0.jpg\n0/../../../secret.jpg\n")
    with pytest.raises(testsets.GroundTruthError,
                       match=r"revisitop1m.txt: line 2 '0/../../../secret.jpg': must be a "
                             r"relative path inside .*revisitop1m/jpg \(no absolute path"):
        testsets.load_revisited(str(tmp_path), "rparis6k", distractors_root=str(tmp_path))
