"""The I/O layer (glam_tf.files): every user path goes through it, on any TF file system.

The walk over the source fails on a built-in file call outside glam_tf/files.py; the unit tests
run the module on a local folder and on TensorFlow's in-memory `ram://` file system.
"""

import ast
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from glam_tf import files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IO_MODULE = "glam_tf/files.py"

# `os.<name>` calls that touch a file system (the rest of `os`, e.g. getpid, environ, is fine).
OS_FILE_CALLS = {
    "open", "makedirs", "mkdir", "replace", "remove", "rename", "renames", "unlink", "rmdir",
    "removedirs", "listdir", "scandir", "stat", "lstat", "walk", "fsync", "chmod", "link",
    "symlink", "truncate", "access", "utime", "fdopen",
}
# Modules whose every use is file-system work.
FILE_MODULES = {"glob", "shutil", "tempfile", "pathlib"}
# Calls that take a path or a file object, and which argument: it must be a file object.
PATH_OR_FILE_CALLS = {("Image", "open"): 0, ("np", "load"): 0, ("np", "save"): 0,
                      ("np", "savez"): 0, ("pickle", "load"): 0, ("pickle", "dump"): 1}


def _sources():
    paths = sorted((REPO_ROOT / "glam_tf").rglob("*.py")) + sorted(REPO_ROOT.glob("*_main.py"))
    return [p for p in paths if str(p.relative_to(REPO_ROOT)) != IO_MODULE]


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return tuple(reversed(parts))
    return None


def _file_objects(tree):
    """Names that hold a file object: `with <call> as f` targets, lambda parameters
    (`atomic_write(path, lambda f: ...)`) and names assigned an `io.BytesIO()`."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and _dotted(node.value.func) == ("io", "BytesIO")):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            names.add(node.optional_vars.id)
        if isinstance(node, ast.Lambda):
            names.update(a.arg for a in node.args.args)
    return names


def file_calls(source: str) -> list:
    """(line, what) of every built-in file-system call in `source`."""
    tree = ast.parse(source)
    file_objects = _file_objects(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""])
            for mod in mods:
                if mod.split(".")[0] in FILE_MODULES:
                    found.append((node.lineno, f"import {mod}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        if name in (("open",), ("io", "open")):
            found.append((node.lineno, ".".join(name)))
        elif name[:2] == ("os", "path") and len(name) == 3:
            found.append((node.lineno, ".".join(name)))
        elif name[0] == "os" and len(name) == 2 and name[1] in OS_FILE_CALLS:
            found.append((node.lineno, ".".join(name)))
        elif name[0] in FILE_MODULES or name[:3] == ("tf", "io", "gfile"):
            found.append((node.lineno, ".".join(name)))
        elif name in PATH_OR_FILE_CALLS or (name[-1] == "save" and name[0] != "tf"
                                             and node.args):
            index = PATH_OR_FILE_CALLS.get(name, 0)  # PIL's image.save(fp, ...) too
            arg = node.args[index] if len(node.args) > index else None
            is_file = (isinstance(arg, ast.Name) and arg.id in file_objects) or (
                isinstance(arg, ast.Call) and _dotted(arg.func) in (
                    ("io", "BytesIO"), ("files", "open_file")))
            if not is_file:
                found.append((node.lineno, ".".join(name) + " on a path"))
    return found


def test_no_file_call_outside_the_io_module():
    offenders = [f"{p.relative_to(REPO_ROOT)}:{line}: {what}"
                 for p in _sources() for line, what in file_calls(p.read_text())]
    assert not offenders, ("built-in file calls outside glam_tf/files.py (use glam_tf.files):\n"
                           + "\n".join(offenders))


def test_the_walk_finds_each_kind_of_call():
    source = textwrap.dedent("""
        import glob, os, shutil
        from PIL import Image
        import numpy as np
        open("x")
        os.path.exists("x")
        os.makedirs("x", exist_ok=True)
        os.replace("a", "b")
        glob.glob("*")
        shutil.rmtree("x")
        Image.open("x.jpg")
        np.save("x.npy", a)
        with files.open_file("x.npy", "rb") as f:
            np.load(f)
        atomic_write("x", lambda f: np.save(f, a))
        Image.open(io.BytesIO(data))
        pickle.dump(obj, "x.pkl")
        image.save("x.png")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        tf.saved_model.save(module, "x")
        tf.io.gfile.glob("*")
        os.getpid()
    """)
    assert [what for _, what in file_calls(source)] == [
        "import glob", "import shutil", "open", "os.path.exists", "os.makedirs", "os.replace",
        "glob.glob", "shutil.rmtree", "Image.open on a path", "np.save on a path",
        "pickle.dump on a path", "image.save on a path", "tf.io.gfile.glob"]


# ---------------------------------------------------------------------------- the module


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"ram://io-{uuid.uuid4().hex[:8]}"


def test_path_strings():
    assert files.join("gs://b/x", "y", "z.txt") == "gs://b/x/y/z.txt"
    assert files.join("a", "b") == os.path.join("a", "b")
    assert files.dirname("gs://b/x/y") == "gs://b/x"
    assert files.basename("ram://a/b.json") == "b.json"
    assert files.scheme("gs://b") == "gs" and files.scheme("/a/b") == ""
    assert files.is_local("file:///a") and not files.is_local("ram://a")
    assert files.absolute("ram://a/b") == "ram://a/b"
    assert files.absolute("a") == os.path.join(os.getcwd(), "a")
    assert files.relpath("gs://b/x/y/z", "gs://b/x") == "y/z"
    with pytest.raises(ValueError, match="is not under"):
        files.relpath("gs://b/q", "gs://b/x")


def test_read_write_list_and_remove(root):
    folder = files.join(root, "a", "b")
    files.makedirs(folder)
    files.makedirs(folder)  # twice is fine
    assert files.isdir(folder) and not files.isfile(folder)
    files.write_json_atomic(files.join(folder, "x.json"), {"k": [1, 2]})
    files.write_text_atomic(files.join(folder, "y.txt"), "é\n")
    assert files.read_json(files.join(folder, "x.json")) == {"k": [1, 2]}
    assert files.read_text(files.join(folder, "y.txt")) == "é\n"
    assert files.getsize(files.join(folder, "y.txt")) == 3
    assert files.listdir(root) == ["a"]
    assert sorted(files.listdir(folder)) == ["x.json", "y.txt"]
    assert files.glob(files.join(root, "*", "b", "*.json")) == [files.join(folder, "x.json")]
    assert files.walk_files(root) == ["a/b/x.json", "a/b/y.txt"]
    files.rename(files.join(folder, "y.txt"), files.join(folder, "x.json"))  # replaces
    assert files.read_text(files.join(folder, "x.json")) == "é\n"
    files.remove(files.join(folder, "x.json"))
    assert not files.exists(files.join(folder, "x.json"))
    files.rmtree(files.join(root, "a"))
    files.rmtree(files.join(root, "a"))  # absent: nothing to do
    assert not files.exists(folder)


def test_numpy_pil_and_seek_through_file_objects(root):
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    files.makedirs(root)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    files.atomic_write(files.join(root, "a.npy"), lambda f: np.save(f, array))
    with files.open_file(files.join(root, "a.npy"), "rb") as f:
        np.testing.assert_array_equal(np.load(f, allow_pickle=False), array)
    pixels = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    files.atomic_write(files.join(root, "p.png"),
                       lambda f: Image.fromarray(pixels).save(f, format="PNG"))
    with files.open_file(files.join(root, "p.png"), "rb") as f, Image.open(f) as im:
        np.testing.assert_array_equal(np.asarray(im), pixels)
    with files.open_file(files.join(root, "p.png"), "rb") as f:
        f.seek(1)
        assert f.read(3) == b"PNG" and f.tell() == 4


def test_atomic_write_leaves_nothing_on_failure(root):
    files.makedirs(root)
    target = files.join(root, "out.bin")
    files.write_bytes_atomic(target, b"whole")

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        files.atomic_write(target, fails)
    assert files.read_bytes(target) == b"whole"
    assert files.listdir(root) == ["out.bin"]


def test_publish_dir_and_remove_temporaries(root):
    files.makedirs(root)
    tmp = files.join(root, ".tmp-7-abc")
    files.makedirs(files.join(tmp, "variables"))
    files.write_bytes_atomic(files.join(tmp, "variables", "v.index"), b"v")
    files.write_bytes_atomic(files.join(tmp, "saved_model.pb"), b"m")
    files.publish_dir(tmp, files.join(root, "7"), last=("saved_model.pb",))
    assert files.listdir(root) == ["7"]
    assert files.read_bytes(files.join(root, "7", "saved_model.pb")) == b"m"
    # What a killed writer leaves: a temporary file and a temporary folder.
    files.write_bytes_atomic(files.join(root, "x.tfrecord.tmp-host-1-ff"), b"half")
    files.makedirs(files.join(root, ".tmp-8-def", "variables"))
    removed = files.remove_temporaries(root)
    assert sorted(files.basename(p) for p in removed) == [".tmp-8-def", "x.tfrecord.tmp-host-1-ff"]
    assert files.listdir(root) == ["7"]
    assert files.remove_temporaries(files.join(root, "absent")) == []


def test_publish_dir_on_an_object_store_copies_the_marker_last(tmp_path, monkeypatch):
    """The object-store branch (copy file by file), run on a local folder through a fake
    scheme: the marker is copied after every other file, and the temporary folder goes."""
    tmp = str(tmp_path / ".tmp-3-x")
    for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index",
                 "variables/variables.data-00000-of-00001"):
        files.makedirs(files.dirname(os.path.join(tmp, name)))
        files.write_bytes_atomic(os.path.join(tmp, name), name.encode())
    order = []
    monkeypatch.setattr(files, "is_local", lambda p: False)
    real_copy = files.copy
    monkeypatch.setattr(files, "copy", lambda s, d: (order.append(os.path.basename(d)),
                                                     real_copy(s, d)))
    files.publish_dir(tmp, str(tmp_path / "3"), last=("saved_model.pb",))
    assert order[-1] == "saved_model.pb" and len(order) == 4
    assert not os.path.exists(tmp)
    assert (tmp_path / "3" / "variables" / "variables.index").read_bytes() == (
        b"variables/variables.index")


def test_check_reachable_refuses_unknown_scheme_and_silent_store(monkeypatch):
    files.check_reachable("/no/such/local/path", "output_dir")  # local: its own checks
    files.check_reachable("ram://anything", "output_dir")
    with pytest.raises(files.UnreachablePathError) as e:
        files.check_reachable("s3://bucket/x", "output_dir")
    assert str(e.value).startswith("--output_dir=s3://bucket/x: TensorFlow has no file system "
                                   "for s3://")

    def hangs(path):
        time.sleep(30)

    class SlowGfile:
        exists = staticmethod(hangs)

    monkeypatch.setattr(files, "_gfile", lambda: SlowGfile)
    start = time.monotonic()
    with pytest.raises(files.UnreachablePathError, match=r"^--model=gs://b/m: the gs:// file "
                       r"system gave no answer in 1 s"):
        files.check_reachable("gs://b/m", "model", timeout_s=1.0)
    assert time.monotonic() - start < 5


def test_gs_without_network_fails_within_seconds_naming_the_path():
    """A real `gs://` path on this machine (no credentials, no network): refused in seconds."""
    start = time.monotonic()
    with pytest.raises(files.UnreachablePathError) as e:
        files.check_reachable("gs://glam-tf-no-such-bucket/eval", "output_dir")
    elapsed = time.monotonic() - start
    assert str(e.value).startswith("--output_dir=gs://glam-tf-no-such-bucket/eval: ")
    assert "\n" not in str(e.value)
    assert elapsed < files.REACH_TIMEOUT_S + 2


def test_a_killed_atomic_write_leaves_only_a_temporary_the_next_run_removes(tmp_path):
    """SIGKILL in the middle of `atomic_write`: the final name never appears half-written;
    the temporary it leaves is what `remove_temporaries` deletes."""
    target = tmp_path / "shard.tfrecord"
    code = textwrap.dedent(f"""
        import sys, time
        from glam_tf import files
        def slow(f):
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        files.atomic_write({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = os.listdir(tmp_path)
    assert not target.exists() and len(left) == 1 and ".tmp-" in left[0]
    assert files.remove_temporaries(str(tmp_path), "shard.tfrecord*") == [
        str(tmp_path / left[0])]
    assert os.listdir(tmp_path) == []


def test_ram_listing_ignores_prefix_siblings_and_local_copy(root):
    """`ram://` lists by name prefix (`assets` seemed to hold `.extra` beside `assets.extra/`);
    the module lists, walks and deletes by real children. `local_copy` gives h5py-style
    readers a local file and removes it after."""
    for name in ("t/assets.extra/info.json", "t/variables/v.index", "t/saved_model.pb"):
        files.makedirs(files.dirname(files.join(root, name)))
        files.write_bytes_atomic(files.join(root, name), name.encode())
    files.makedirs(files.join(root, "t", "assets"))
    assert files.listdir(files.join(root, "t", "assets")) == []
    assert files.walk_files(files.join(root, "t")) == [
        "assets.extra/info.json", "saved_model.pb", "variables/v.index"]
    with files.local_copy(files.join(root, "t", "saved_model.pb")) as local:
        with open(local, "rb") as f:
            assert f.read() == b"t/saved_model.pb"
    assert files.is_local(root) == os.path.exists(local)
    files.rmtree(files.join(root, "t"))
    assert not files.exists(files.join(root, "t", "assets.extra", "info.json"))
    assert not files.exists(files.join(root, "t"))


def test_undecodable_reason_is_byte_stable():
    """Pillow names the in-memory file (`<_io.BytesIO object at 0x7f...>`) in its message;
    the reason written to undecodable_images.txt and the shard reports does not."""
    from glam_tf.data import records  # noqa: PLC0415

    with pytest.raises(records.UndecodableImageError) as e:
        records.probe_image(b"<html>404 not found</html>")
    assert str(e.value) == "UnidentifiedImageError: cannot identify image file the image bytes"
