"""Retrieval test sets: Revisited Oxford/Paris (+1M distractors) and the original Oxford5k/Paris6k.

Both loaders return a `TestSet` in the revisited structure (see EVAL_PROTOCOL.md):
`imlist` (database names), `qimlist` (query names) and `gnd` (one dict per query with
`bbx` [x1, y1, x2, y2] or None and 0-based int64 index arrays `easy`, `hard`, `junk`
into `imlist`). The original protocol maps good ∪ ok to `easy` and leaves `hard` empty,
so its single setup (positives = good ∪ ok, junk ignored) is the revisited "Medium".

Layouts read (nothing is downloaded):
- revisited: `<root>/<name>/jpg/<image>.jpg` and `<root>/<name>/gnd_<name>.pkl`
  (`roxford5k`, `rparis6k`, and `synth`, the synthetic split glam_tf.data.synthetic writes);
- distractors: `<distractors_root>/revisitop1m/revisitop1m.txt` listing one path per line
  (extension included) relative to `<distractors_root>/revisitop1m/jpg/`;
- original: `<root>/<name>/jpg/**/<image>.jpg` (flat, or in sub-folders as Paris unpacks
  into `paris/<landmark>/`) and the ground-truth text files in `<root>/<name>/gt_files/`.
"""

import dataclasses
import io
import math
import pickle

import numpy as np
from PIL import Image

from glam_tf import files
from glam_tf.config.contract import DISTRACTORS, ORIGINAL, REVISITED
from glam_tf.safe_pickle import safe_load_pickle


_SOURCES = {
    "roxford5k": "http://cmp.felk.cvut.cz/revisitop/ (images: the Oxford Buildings "
                 "oxbuild_images-v1.tgz, ground truth: gnd_roxford5k.pkl)",
    "rparis6k": "http://cmp.felk.cvut.cz/revisitop/ (images: the Paris Buildings "
                "paris_1-v1.tgz + paris_2-v1.tgz, ground truth: gnd_rparis6k.pkl)",
    "synth": "glam_tf.data.synthetic.generate_synthetic_landmarks(root, ...) (writes "
             "<root>/synth/jpg and <root>/synth/gnd_synth.pkl)",
    "synth_val": "glam_tf.data.synthetic.generate_synthetic_landmarks(root, ...) with "
                 "num_val_landmarks > 0 (writes <root>/synth_val/jpg and "
                 "<root>/synth_val/gnd_synth_val.pkl)",
    DISTRACTORS: "http://cmp.felk.cvut.cz/revisitop/ (revisitop1m.txt and the "
                 "revisitop1m.{1..100}.tar.gz image archives)",
    "oxford5k": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/ (oxbuild_images-v1.tgz "
                "into jpg/, gt_files_170407.tgz into gt_files/)",
    "paris6k": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/ (paris_1-v1.tgz and "
               "paris_2-v1.tgz into jpg/, paris_120310.tgz into gt_files/)",
}
_ORIGINAL_QUERY_PREFIX = {"oxford5k": "oxc1_", "paris6k": ""}
_IMAGE_EXT = ".jpg"


def revisited_dir(root, name):
    """`<root>/<name>`: the folder of revisited test set `name`."""
    return files.join(root, name)


def revisited_image_dir(root, name):
    """`<root>/<name>/jpg`: its images (database and queries), `<image>.jpg` each."""
    return files.join(revisited_dir(root, name), "jpg")


def revisited_image_path(root, name, image):
    """`<root>/<name>/jpg/<image>.jpg`: image `image` of revisited test set `name`."""
    return files.join(revisited_image_dir(root, name), image + _IMAGE_EXT)


def revisited_gnd_path(root, name):
    """`<root>/<name>/gnd_<name>.pkl`: its ground truth."""
    return files.join(revisited_dir(root, name), f"gnd_{name}.pkl")


def write_revisited_gnd(path, imlist, qimlist, gnd):
    """Writes a ground-truth pickle `load_revisited` reads (protocol 4, atomic).

    Args:
        imlist / qimlist: database / query image names (no extension).
        gnd: per query a dict with `bbx` and int64 index arrays `easy`, `hard`, `junk`.
    """
    files.atomic_write(path, lambda f: pickle.dump(
        {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=4))


class MissingDataError(FileNotFoundError):
    """Raised with the complete list of missing test-set files and where to get them."""


class GroundTruthError(ValueError):
    """Ground truth that parses but breaks a rule of the protocol: one line naming the file,
    the entry and the rule."""

    def __init__(self, path, entry, rule):
        super().__init__(f"{path}: {entry}: {rule}")


@dataclasses.dataclass
class TestSet:
    """One retrieval benchmark: database, queries and per-query ground truth.

    Attributes:
        name: dataset name (`roxford5k`, `rparis6k`, `synth`, `oxford5k`, `paris6k`).
        image_dir: folder of the database images.
        imlist: database image names (no extension), the index space of `gnd`.
        qimlist: query image names, one per entry of `gnd`.
        gnd: per query a dict with `bbx` ([x1, y1, x2, y2] floats or None) and int64
            index arrays `easy`, `hard`, `junk` into `imlist`.
        query_dir: folder of the query images (== image_dir for these benchmarks).
        protocol: "revisited" (Easy/Medium/Hard) or "original" (one setup, mAP only).
        distractors: names of the extra negatives appended after `imlist` in the database
            (revisitop1m paths, extension included), empty without distractors.
        distractor_dir: folder the distractor names are relative to.
        relpaths: name -> path relative to image_dir, for layouts with sub-folders.
    """

    __test__ = False  # keep pytest from collecting this class from test modules

    name: str
    image_dir: str
    imlist: list
    qimlist: list
    gnd: list
    query_dir: str
    protocol: str = "revisited"
    distractors: list = dataclasses.field(default_factory=list)
    distractor_dir: str = ""
    relpaths: dict = dataclasses.field(default_factory=dict, repr=False)

    def image_path(self, name):
        """Path of database image `name` (a test-set image, not a distractor)."""
        rel = self.relpaths.get(name, name + _IMAGE_EXT)
        return files.join(self.image_dir, rel)

    def query_path(self, name):
        """Path of the full (uncropped) query image `name`."""
        rel = self.relpaths.get(name, name + _IMAGE_EXT)
        return files.join(self.query_dir, rel)

    def distractor_path(self, name):
        """Path of distractor `name` (a line of revisitop1m.txt)."""
        return files.join(self.distractor_dir, name)

    @property
    def num_database(self):
        """Database size: test-set images plus distractors."""
        return len(self.imlist) + len(self.distractors)

    def database_ids(self):
        """All database names in index order: imlist, then distractors."""
        return list(self.imlist) + list(self.distractors)

    def database_paths(self):
        """All database image paths in index order: imlist, then distractors."""
        return [self.database_path(i) for i in range(self.num_database)]

    def database_path(self, index):
        """Path of database image `index` (imlist first, then distractors)."""
        if index < len(self.imlist):
            return self.image_path(self.imlist[index])
        return self.distractor_path(self.distractors[index - len(self.imlist)])

    def database_id(self, index):
        """Name of database image `index`."""
        if index < len(self.imlist):
            return self.imlist[index]
        return self.distractors[index - len(self.imlist)]

    def query_boxes(self):
        """Per query the crop box [x1, y1, x2, y2] or None."""
        return [g.get("bbx") for g in self.gnd]


# ----------------------------------------------------------------------------------------
# Loaders.

def _raise_missing(name, missing):
    lines = [f"test set '{name}': {len(missing)} required file(s)/folder(s) missing:"]
    for path, what, source in missing:
        lines.append(f"  - {path} ({what}); get it from {source}")
    raise MissingDataError("\n".join(lines))


GND_KEYS = ("bbx", "easy", "hard", "junk")  # EVAL_PROTOCOL.md: one dict per query
# A box edge may sit up to this many pixels past the image border (Pillow rounds the
# coordinates; the original Oxford boxes reach x2 = 1024 on 1024-pixel images).
BOX_SLACK_PX = 1.0


def _index_array(values, *, field, query, size, path):
    """`gnd[query][field]` as int64 indices into imlist; GroundTruthError unless integers
    in [0, size)."""
    entry = f"gnd[{query}]['{field}']"
    try:
        arr = np.asarray(values if values is not None else [])
    except ValueError as e:
        raise GroundTruthError(path, entry, f"must be a flat list of integers ({e})") from None
    if arr.size and arr.dtype.kind not in "iu":
        raise GroundTruthError(path, entry, f"must hold integer indices into imlist, got "
                                            f"{arr.dtype} values")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= size):
        raise GroundTruthError(path, entry, f"has indices outside [0, {size}) (min "
                                            f"{arr.min()}, max {arr.max()})")
    return arr


def _parse_box(bbx, *, query, path, image_size=None):
    """`bbx` as [x1, y1, x2, y2] floats (None stays None); GroundTruthError unless four
    finite numbers with 0 <= x1 < x2, 0 <= y1 < y2, inside the image when its (width,
    height) `image_size` is known (to within BOX_SLACK_PX)."""
    if bbx is None:
        return None
    entry = f"gnd[{query}]['bbx']"
    try:
        box = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        raise GroundTruthError(path, entry, f"must be four numbers [x1, y1, x2, y2], got "
                                            f"{bbx!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise GroundTruthError(path, entry, f"must be four finite numbers [x1, y1, x2, y2], "
                                            f"got {bbx!r}")
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise GroundTruthError(path, entry, f"must have 0 <= x1 < x2 and 0 <= y1 < y2, got "
                                            f"{box}")
    if image_size is not None:
        width, height = image_size
        if x2 > width + BOX_SLACK_PX or y2 > height + BOX_SLACK_PX:
            raise GroundTruthError(path, entry, f"{box} reaches outside the {width}x{height} "
                                                "query image")
    return box


def _image_size(path):
    """(width, height) from the image header, or None when it cannot be read."""
    try:
        with Image.open(io.BytesIO(files.read_bytes(path))) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _escapes(name):
    """True when `name`, joined under a folder, could leave it (absolute, '..', NUL)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or "://" in name or ".." in parts or "\0" in name


def _name_list(values, *, field, path, folder):
    """`values` as a list of unique relative names inside `folder`; GroundTruthError
    naming the entry and the rule otherwise."""
    if not isinstance(values, (list, tuple)):
        raise GroundTruthError(path, field, f"must be a list of image names, got a "
                                            f"{type(values).__name__}")
    seen = {}
    for i, name in enumerate(values):
        entry = f"{field}[{i}]"
        if not isinstance(name, str) or not name:
            raise GroundTruthError(path, entry, f"must be a non-empty name, got {name!r}")
        if _escapes(name):
            raise GroundTruthError(path, f"{entry} {name!r}", f"must be a relative name "
                                   f"inside {folder} (no absolute path, no '..')")
        if name in seen:
            raise GroundTruthError(path, f"{entry} {name!r}", f"duplicate of {field}"
                                   f"[{seen[name]}] (names must be unique)")
        seen[name] = i
    return [str(n) for n in values]


def check_revisited(cfg, path, image_dir):
    """The meaning of a revisited ground truth (EVAL_PROTOCOL.md), entry by entry.

    Args:
        cfg: the unpickled dict with `imlist`, `qimlist` and `gnd`.
        path: the pickle (named in errors).
        image_dir: folder the names are relative to; query boxes are checked against the
            query images' sizes where their headers can be read.

    Returns:
        (imlist, qimlist, gnd) with boxes as float lists and int64 index arrays.

    Raises:
        GroundTruthError: one line naming the file, the entry and the rule broken.
    """
    imlist = _name_list(cfg["imlist"], field="imlist", path=path, folder=image_dir)
    qimlist = _name_list(cfg["qimlist"], field="qimlist", path=path, folder=image_dir)
    entries = cfg["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise GroundTruthError(path, "gnd", f"must be a list with one entry per query, got "
                                            f"a {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise GroundTruthError(path, "gnd", f"{len(entries)} entries for {len(qimlist)} "
                                            "queries (one per query)")
    gnd = []
    for q, g in enumerate(entries):
        if not isinstance(g, dict) or not set(GND_KEYS) <= set(g):
            have = sorted(map(str, g)) if isinstance(g, dict) else type(g).__name__
            raise GroundTruthError(path, f"gnd[{q}]", f"must be a dict with keys "
                                   f"{list(GND_KEYS)}, got {have}")
        size = _image_size(files.join(image_dir, qimlist[q] + _IMAGE_EXT))
        gnd.append({
            "bbx": _parse_box(g["bbx"], query=q, path=path, image_size=size),
            **{k: _index_array(g[k], field=k, query=q, size=len(imlist), path=path)
               for k in ("easy", "hard", "junk")},
        })
    return imlist, qimlist, gnd


def _check_relative_lines(lines, *, path, folder):
    """Distractor list lines: relative paths inside `folder` (GroundTruthError otherwise)."""
    for i, line in enumerate(lines):
        if _escapes(line):
            raise GroundTruthError(path, f"line {i + 1} {line!r}", f"must be a relative path "
                                   f"inside {folder} (no absolute path, no '..')")
    return lines


def _read_lines(path):
    with files.open_file(path) as f:
        return [line.strip() for line in f if line.strip()]


def load_revisited(root, name, *, distractors_root=None):
    """Loads Revisited Oxford/Paris (or the synthetic split), optionally with +1M distractors.

    Args:
        root: folder holding `<name>/jpg/` and `<name>/gnd_<name>.pkl`.
        name: one of `roxford5k`, `rparis6k`, `synth`.
        distractors_root: folder holding `revisitop1m/revisitop1m.txt` and
            `revisitop1m/jpg/`; None for no distractors.

    Returns:
        A `TestSet` (protocol "revisited"); distractors come after `imlist` in the database.

    Raises:
        ValueError: unknown name.
        GroundTruthError: ground truth that breaks a rule (`check_revisited`).
        MissingDataError: files are missing (all of them listed, with their source).
        UnsafePickleError: the pickle asks for code outside the allow-list.
    """
    if name not in REVISITED:
        raise ValueError(f"load_revisited: name must be one of {REVISITED}, got {name!r} "
                         f"(use load_original for {ORIGINAL})")
    image_dir = revisited_image_dir(root, name)
    gnd_path = revisited_gnd_path(root, name)
    missing = []
    if not files.isdir(image_dir):
        missing.append((image_dir, "image folder", _SOURCES[name]))
    if not files.isfile(gnd_path):
        missing.append((gnd_path, "ground-truth pickle", _SOURCES[name]))
    dist_list, dist_dir = None, ""
    if distractors_root is not None:
        dist_list = files.join(distractors_root, DISTRACTORS, f"{DISTRACTORS}.txt")
        dist_dir = files.join(distractors_root, DISTRACTORS, "jpg")
        if not files.isfile(dist_list):
            missing.append((dist_list, "distractor list", _SOURCES[DISTRACTORS]))
        if not files.isdir(dist_dir):
            missing.append((dist_dir, "distractor image folder", _SOURCES[DISTRACTORS]))
    if missing:
        _raise_missing(name, missing)

    cfg = safe_load_pickle(gnd_path)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{gnd_path}: expected a dict with keys 'imlist', 'qimlist', 'gnd', "
                         f"got {type(cfg).__name__} with keys "
                         f"{sorted(cfg) if isinstance(cfg, dict) else '-'}")
    imlist, qimlist, gnd = check_revisited(cfg, gnd_path, image_dir)
    distractors = (_check_relative_lines(_read_lines(dist_list), path=dist_list,
                                         folder=dist_dir) if dist_list else [])
    return TestSet(name=name, image_dir=image_dir, imlist=imlist, qimlist=qimlist, gnd=gnd,
                   query_dir=image_dir, protocol="revisited", distractors=distractors,
                   distractor_dir=dist_dir)


def _scan_images(image_dir):
    """Maps image name (file stem) -> path relative to image_dir, searching sub-folders."""
    relpaths = {}
    for rel in files.walk_files(image_dir):
        if rel.endswith(_IMAGE_EXT):
            relpaths[files.splitext(files.basename(rel))[0]] = rel
    return relpaths


def parse_original_gt(gt_dir, name):
    """Parses the distributed Oxford5k / Paris6k ground-truth text files.

    Args:
        gt_dir: folder with `<landmark>_<k>_{query,good,ok,junk}.txt`.
        name: `oxford5k` (query names carry an `oxc1_` prefix, stripped) or `paris6k`
            (no prefix; its `_good.txt` files are empty, all positives are in `_ok.txt`).

    Returns:
        A list, sorted by query file name, of dicts: `query_id` (`all_souls_1`), `name`
        (image name), `bbx` [x1, y1, x2, y2], and name lists `good`, `ok`, `junk`.
    """
    prefix = _ORIGINAL_QUERY_PREFIX[name]
    entries = []
    for qfile in sorted(files.glob(files.join(gt_dir, "*_query.txt"))):
        qid = files.basename(qfile)[:-len("_query.txt")]
        lines = _read_lines(qfile)
        fields = lines[0].split() if lines else []
        if len(fields) != 5:
            raise ValueError(f"{qfile}: expected '<image> x1 y1 x2 y2', got {fields!r}")
        qname = fields[0][len(prefix):] if prefix and fields[0].startswith(prefix) else fields[0]
        entry = {"query_id": qid, "name": qname,
                 "bbx": _parse_box([float(v) for v in fields[1:]], query=qid, path=qfile)}
        for kind in ("good", "ok", "junk"):
            entry[kind] = _read_lines(files.join(gt_dir, f"{qid}_{kind}.txt"))
        entries.append(entry)
    return entries


def load_original(root, name, *, gt_dir=None):
    """Loads original Oxford5k / Paris6k from its distributed ground-truth text files.

    Queries ARE database images; positives = good ∪ ok (stored as `easy`, `hard` empty),
    junk ignored; the database is every `.jpg` under `<root>/<name>/jpg/` (sorted names).

    Args:
        root: folder holding `<name>/jpg/` and `<name>/gt_files/`.
        name: `oxford5k` or `paris6k`.
        gt_dir: ground-truth folder, overriding `<root>/<name>/gt_files`.

    Raises:
        MissingDataError: image/ground-truth folders, per-query files or images named by
            the ground truth are missing (all listed, with the download site).
    """
    if name not in ORIGINAL:
        raise ValueError(f"load_original: name must be one of {ORIGINAL}, got {name!r} "
                         f"(use load_revisited for {REVISITED})")
    image_dir = files.join(root, name, "jpg")
    gt_dir = gt_dir or files.join(root, name, "gt_files")
    missing = []
    if not files.isdir(image_dir):
        missing.append((image_dir, "image folder", _SOURCES[name]))
    if not files.isdir(gt_dir) or not files.glob(files.join(gt_dir, "*_query.txt")):
        missing.append((gt_dir, "ground-truth folder with *_query.txt files", _SOURCES[name]))
    else:
        for qfile in sorted(files.glob(files.join(gt_dir, "*_query.txt"))):
            qid = qfile[:-len("_query.txt")]
            for kind in ("good", "ok", "junk"):
                if not files.isfile(f"{qid}_{kind}.txt"):
                    missing.append((f"{qid}_{kind}.txt", "ground-truth list", _SOURCES[name]))
    if missing:
        _raise_missing(name, missing)

    entries = parse_original_gt(gt_dir, name)
    relpaths = _scan_images(image_dir)
    needed = sorted({n for e in entries for n in [e["name"], *e["good"], *e["ok"], *e["junk"]]}
                    - set(relpaths))
    if needed:
        shown = ", ".join(needed[:20]) + (" ..." if len(needed) > 20 else "")
        _raise_missing(name, [(files.join(image_dir, "<name>.jpg"),
                               f"{len(needed)} image(s) named by the ground truth: {shown}",
                               _SOURCES[name])])
    for e in entries:  # the query boxes inside their images (where the headers read)
        _parse_box(e["bbx"], query=e["query_id"],
                   path=files.join(gt_dir, f"{e['query_id']}_query.txt"),
                   image_size=_image_size(files.join(image_dir, relpaths[e["name"]])))
    imlist = sorted(relpaths)
    index = {n: i for i, n in enumerate(imlist)}
    gnd = []
    for e in entries:
        positives = sorted({index[n] for n in e["good"] + e["ok"]})
        gnd.append({"bbx": e["bbx"], "easy": np.asarray(positives, dtype=np.int64),
                    "hard": np.zeros(0, dtype=np.int64),
                    "junk": np.asarray(sorted({index[n] for n in e["junk"]}), dtype=np.int64)})
    return TestSet(name=name, image_dir=image_dir, imlist=imlist,
                   qimlist=[e["name"] for e in entries], gnd=gnd, query_dir=image_dir,
                   protocol="original", relpaths=relpaths)


def load_testset(root, name, *, distractors_root=None):
    """Dispatches to `load_revisited` or `load_original` by dataset name."""
    if name in REVISITED:
        return load_revisited(root, name, distractors_root=distractors_root)
    if name in ORIGINAL:
        if distractors_root is not None:
            raise ValueError(f"distractors (revisitop1m) go with the revisited sets "
                             f"{REVISITED[:2]}, not with {name!r}")
        return load_original(root, name)
    raise ValueError(f"unknown test set {name!r}: expected one of {REVISITED + ORIGINAL}")
