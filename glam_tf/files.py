"""The one I/O module: every path a user passes is read and written here, through `tf.io.gfile`.

So the same code runs on a local disk, TensorFlow's in-memory `ram://` file system and an
object store (`gs://`; other schemes when a TensorFlow plug-in registers them), and a wrong
scheme or an unreachable store is refused up front (`check_reachable`) instead of writing a
local folder literally named `gs:`. `tests/test_io_layer.py` walks the package and fails on a
built-in file call anywhere else.

Questions about local paths (exists, isdir, listdir, glob, stat) are answered by Python's own
calls here, without TensorFlow: the programs check their flags before importing it (a bad
path stays a one-line refusal), and they are 4-5x faster (`exists`: 3.4 vs 16 us), which
counts when the GLDv2 planner asks for millions of images. Everything is read and written
through `tf.io.gfile` (`open_file`), local paths included.

What stays local, on purpose (the only built-in file calls of the package, all here):
  - `fsync` of a file just written to a local disk (`atomic_write`, `_sync_local`): gfile has
    no fsync, and a rename without it can publish an empty file after a power cut. Object
    stores make a file durable when its upload completes.
  - `scratch_dir()`: a private temporary folder (`tempfile.mkdtemp`) for copies nobody else
    reads, e.g. the clean copies of damaged shards when the user gives no folder for them,
    and `local_copy` of a remote file for a reader that takes only a local name (Keras's
    `.h5` weights go through h5py).
  - `stat` of a local file: gfile's modification time is in whole seconds; `os.stat` keeps
    the nanoseconds that tell a rewritten shard from the one verified before.
  - `read_local_text`: kernel files such as `/proc/self/maps` (glam_tf.eval.refine) report
    a size of 0, and gfile reads a file up to its reported size, so they are read with `open`.
  - `local_writable`: whether the Keras weights cache (`~/.keras`, glam_tf.model.backbone) may
    go in the home folder; that cache is Keras's own, always local.

Publishing (how a file, a shard, a checkpoint and an export version become visible only when
complete, README "Where files can live"):
  - A file is written under `temporary_path(path)` (`<path>.tmp-<host>-<pid>-<random>`, never
    matching a reader's pattern) and renamed to `path` last (`atomic_write`). On a local disk
    the rename is atomic; on an object store a file is one object, which appears whole when
    its copy completes.
  - A folder (a SavedModel version) is built under a temporary name that is not a number and
    published by `publish_dir`: one rename on a local disk; elsewhere (an object store, where
    a folder rename is a copy object by object, and `ram://`) the files are copied with the
    completion marker (`saved_model.pb`) last, so a reader that requires the marker never
    loads a partial version.
  - `remove_temporaries` deletes what a killed writer left under temporary names.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fnmatch
import functools
import glob as glob_lib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import uuid

TEMPORARY_TAG = ".tmp-"  # in every temporary name: `<final>.tmp-...` or `.tmp-<version>-...`
REACH_TIMEOUT_S = 10.0  # `check_reachable` gives a remote file system this long to answer


def _gfile():
    """`tf.io.gfile`, imported on first use: the flag checks import this module without
    loading TensorFlow, and pay for it only when they touch a path."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.io.gfile


@contextlib.contextmanager
def _os_errors(path):
    """TensorFlow's file errors as the built-in ones (`FileNotFoundError`, `PermissionError`,
    `OSError`), so callers catch what they would catch around `open`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        yield
    except tf.errors.NotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, e.message or "No such file or directory",
                                str(path)) from e
    except tf.errors.PermissionDeniedError as e:
        raise PermissionError(errno.EACCES, e.message, str(path)) from e
    except tf.errors.OpError as e:
        raise OSError(errno.EIO, e.message, str(path)) from e


@functools.cache
def _file_class():
    """`tf.io.gfile.GFile` whose lazy open raises the built-in errors (`_os_errors`)."""
    gfile = _gfile()

    class File(gfile.GFile):
        def _preread_check(self):
            with _os_errors(self.name):
                super()._preread_check()

        def read(self, n=-1):
            # GFile raises OutOfRangeError for a read past the end; a file returns what is
            # left (Pillow and numpy read ahead and expect that).
            self._preread_check()
            if self._known_size is None:
                self._known_size = self.size()
            left = max(0, self._known_size - self.tell())
            return super().read(left if n is None or n < 0 else min(n, left))

        def seek(self, offset=None, whence=0, position=None):
            # GFile refuses to seek past the end (OutOfRangeError); a file allows it, and its
            # reads return nothing there: stop at the end.
            self._preread_check()
            if self._known_size is None:
                self._known_size = self.size()
            offset = offset if offset is not None else position
            base = {0: 0, 1: self.tell(), 2: self._known_size}[whence]
            return super().seek(min(max(0, base + offset), self._known_size))

        def _prewrite_check(self):
            with _os_errors(self.name):
                super()._prewrite_check()

    File._known_size = None
    return File


# ---------------------------------------------------------------------------- path strings


def scheme(path) -> str:
    """The URL scheme of `path` (`gs`, `ram`, ...), '' for a local path."""
    path = os.fspath(path)
    head, sep, _ = path.partition("://")
    return head if sep and head.isidentifier() else ""


def is_local(path) -> bool:
    """Whether `path` is on the local file system (no scheme, or `file://`)."""
    return scheme(path) in ("", "file")


def join(path, *parts) -> str:
    """Joins path components; `gs://b/x` + `y` is `gs://b/x/y` (URLs use '/')."""
    path = os.fspath(path)
    if is_local(path):
        return os.path.join(path, *map(os.fspath, parts))
    return posixpath.join(path, *map(os.fspath, parts))


def dirname(path) -> str:
    """The folder of `path` (`gs://b/x` for `gs://b/x/y`)."""
    path = os.fspath(path)
    if is_local(path):
        return os.path.dirname(path)
    head, sep, rest = path.partition("://")
    return head + sep + posixpath.dirname(rest) if sep else posixpath.dirname(path)


def basename(path) -> str:
    """The last component of `path`."""
    path = os.fspath(path)
    return os.path.basename(path) if is_local(path) else posixpath.basename(path)


def splitext(name) -> tuple:
    """(`root`, `.ext`) of a file name."""
    return posixpath.splitext(os.fspath(name))


def relpath(path, start) -> str:
    """`path` relative to the folder `start` (both local, or both under one URL)."""
    path, start = os.fspath(path), os.fspath(start)
    if is_local(path):
        return os.path.relpath(path, start)
    prefix = start.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path!r} is not under {start!r}")
    return path[len(prefix):]


def absolute(path) -> str:
    """`path` made absolute when local (URLs are absolute already): the form stored in
    records that must not depend on the working directory."""
    path = os.fspath(path)
    return os.path.abspath(path) if scheme(path) == "" else path


def expanduser(path) -> str:
    """`~` expanded in a local path."""
    return os.path.expanduser(os.fspath(path))


# ---------------------------------------------------------------------------- file system


def open_file(path, mode: str = "r"):
    """A file object for `path` (`tf.io.gfile.GFile`: read/write/seek/tell, binary or text
    by `mode`), usable with `json`, `csv`, `np.save/np.load`, `PIL.Image.open`, `pickle`.
    A missing file raises FileNotFoundError at the first read, other failures OSError."""
    return _file_class()(os.fspath(path), mode)


def read_bytes(path) -> bytes:
    """The whole file as bytes."""
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    """The whole file as UTF-8 text."""
    return read_bytes(path).decode("utf-8")


def read_json(path):
    """The JSON value stored in `path`."""
    return json.loads(read_bytes(path))


def exists(path) -> bool:
    """Whether a file or folder `path` exists. Raises OSError when the file system cannot
    answer (no credentials, no network, unknown scheme)."""
    path = os.fspath(path)
    if scheme(path) == "":
        return os.path.exists(path)
    with _os_errors(path):
        return _gfile().exists(path)


def isdir(path) -> bool:
    """Whether `path` is a folder (False when absent)."""
    path = os.fspath(path)
    if scheme(path) == "":
        return os.path.isdir(path)
    with _os_errors(path):
        return _gfile().isdir(path)


def isfile(path) -> bool:
    """Whether `path` is a file (exists and is no folder)."""
    path = os.fspath(path)
    return exists(path) and not isdir(path)


def makedirs(path) -> None:
    """Creates the folder `path` and its parents (no error when it exists)."""
    with _os_errors(path):
        _gfile().makedirs(os.fspath(path))


def listdir(path) -> list:
    """Sorted names of the entries of the folder `path` (folders without a trailing '/')."""
    path = os.fspath(path)
    if scheme(path) == "":
        return sorted(os.listdir(path))
    with _os_errors(path):
        names = [n.rstrip("/") for n in _gfile().listdir(path)]
    if scheme(path) == "ram":
        # TensorFlow's ram:// lists by name prefix: `a` also "holds" `.extra` when a sibling
        # `a.extra/` exists. Keep the names that exist as children.
        names = [n for n in names if exists(join(path, n))]
    return sorted(names)


def glob(pattern) -> list:
    """Sorted paths matching the glob `pattern` (`*`, `?`, `[...]` in any component)."""
    pattern = os.fspath(pattern)
    if scheme(pattern) == "":
        return sorted(glob_lib.glob(pattern))
    with _os_errors(pattern):
        return sorted(_gfile().glob(pattern))


def walk_files(folder) -> list:
    """Every file under `folder`, as paths relative to it, sorted."""
    folder = os.fspath(folder)
    out = []
    for name in listdir(folder):
        path = join(folder, name)
        if isdir(path):
            out.extend(join(name, sub) for sub in walk_files(path))
        else:
            out.append(name)
    return sorted(out)


def remove(path) -> None:
    """Deletes the file `path`."""
    with _os_errors(path):
        _gfile().remove(os.fspath(path))


def rmtree(path) -> None:
    """Deletes the folder `path` and everything in it (nothing when it is absent)."""
    path = os.fspath(path)
    if not exists(path):
        return
    if scheme(path) == "ram":  # its recursive delete trips on prefix siblings (`listdir`)
        _ram_rmtree(path)
        return
    with _os_errors(path):
        _gfile().rmtree(path)


def _ram_rmtree(path: str) -> None:
    """Deletes a `ram://` folder entry by entry, files first, then folders deepest first."""
    if not isdir(path):
        remove(path)
        return
    for name in listdir(path):
        _ram_rmtree(join(path, name))
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        _gfile().remove(path)
    except tf.errors.NotFoundError:
        pass


def rename(src, dst) -> None:
    """Renames `src` to `dst`, replacing a file there (a copy on object stores)."""
    with _os_errors(src):
        _gfile().rename(os.fspath(src), os.fspath(dst), overwrite=True)


def copy(src, dst) -> None:
    """Copies the file `src` to `dst`, replacing a file there."""
    with _os_errors(src):
        _gfile().copy(os.fspath(src), os.fspath(dst), overwrite=True)


def stat(path) -> tuple:
    """(size in bytes, modification time in ns) of the file `path` (the time is 0 on file
    systems that keep none, e.g. `ram://`). Local files through `os.stat`: gfile gives
    their time in whole seconds, too coarse to tell a shard rewritten within a second."""
    if scheme(path) == "":
        st = os.stat(os.fspath(path))
        return int(st.st_size), int(st.st_mtime_ns)
    with _os_errors(path):
        st = _gfile().stat(os.fspath(path))
    return int(st.length), int(st.mtime_nsec)


def getsize(path) -> int:
    """Size of the file `path` in bytes."""
    return stat(path)[0]


def read_local_text(path) -> str:
    """A local kernel file such as `/proc/self/maps` (see module doc: gfile reads its
    reported size, 0, so nothing)."""
    with open(os.fspath(path), encoding="utf-8") as f:
        return f.read()


def local_writable(path) -> bool:
    """Whether this process may write into the local folder `path` (e.g. the Keras cache)."""
    return os.access(os.fspath(path), os.W_OK)


def which(program):
    """Path of the executable `program` on $PATH, or None."""
    return shutil.which(program)


@contextlib.contextmanager
def local_copy(path):
    """Yields a local path holding the file `path`: `path` itself when local, else a copy in
    a scratch folder, deleted after. For readers that take only a local file name (Keras's
    `.h5` weights through h5py)."""
    path = os.fspath(path)
    if is_local(path):
        yield path
        return
    folder = scratch_dir("glam_tf_copy_")
    local = os.path.join(folder, basename(path))
    try:
        copy(path, local)
        yield local
    finally:
        rmtree(folder)


def scratch_dir(prefix: str) -> str:
    """A new private local folder for scratch files nobody else reads (see module doc)."""
    return tempfile.mkdtemp(prefix=prefix)


# ---------------------------------------------------------------------------- publishing


def temporary_path(path) -> str:
    """`{path}.tmp-{host}-{pid}-{random}`: unique across hosts, processes and attempts, so
    two writers of the same path on a shared disk never write into one temporary file (the
    last rename wins, whole)."""
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return f"{os.fspath(path)}{TEMPORARY_TAG}{host}-{os.getpid()}-{uuid.uuid4().hex}"


def _sync_local(path: str) -> None:
    """fsync of a local file just written (gfile has none; see module doc)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Calls `write(f)` on a temporary binary file (`temporary_path`), makes it durable and
    renames it to `path`: a reader (or a crash) never sees half a file. The temporary file is
    removed when `write` fails.
    """
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        with open_file(tmp, "wb") as f:
            f.write(b"")  # gfile creates the file at its first write: an empty one too
            write(f)
        if is_local(tmp):
            _sync_local(tmp)
        rename(tmp, path)
    except BaseException:
        # Not `exists(tmp)` first: for `missing/../x` Python's answer (no such folder) and
        # TensorFlow's (the name normalised, the file there) differ; gfile removes it.
        with contextlib.suppress(OSError):
            remove(tmp)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    """`data` to `path`, through `atomic_write`."""
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path, text: str) -> None:
    """UTF-8 `text` to `path`, through `atomic_write`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj) -> None:
    """`obj` as indented, key-sorted JSON to `path`, through `atomic_write`."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def publish_dir(tmp, final, *, last=()) -> None:
    """Makes the complete folder `tmp` visible as `final` (which must not exist).

    On a local disk one rename: atomic. Elsewhere (an object store, where a folder rename is
    a copy object by object; `ram://`, whose folder rename moves no file) the files are copied
    one by one, those named in `last` (completion markers, relative paths) after all others,
    and `tmp` is deleted after.
    """
    tmp, final = os.fspath(tmp), os.fspath(final)
    if is_local(final):
        rename(tmp, final)
        return
    names = walk_files(tmp)
    for name in sorted(names, key=lambda n: (n in last, n)):
        makedirs(dirname(join(final, name)))
        copy(join(tmp, name), join(final, name))
    rmtree(tmp)


def remove_temporaries(folder, pattern: str = "*") -> list:
    """Deletes the entries of `folder` whose name matches `pattern` and holds `TEMPORARY_TAG`
    (files or folders a killed writer left); returns what it deleted. Call it only where no
    other writer is running (a program's start, for the folders only it writes)."""
    folder = os.fspath(folder)
    if not isdir(folder):
        return []
    removed = []
    for name in listdir(folder):
        if TEMPORARY_TAG in name and fnmatch.fnmatchcase(name, pattern):
            path = join(folder, name)
            if isdir(path):
                rmtree(path)
            else:
                remove(path)
            removed.append(path)
    return removed


def ensure_writable_dir(path, flag: str) -> None:
    """Creates directory `path` if needed and proves it writable with a probe file.

    Run before heavy work, so a program pointed at a file, a read-only folder or a full
    disk refuses at once (glam_tf.refusal) instead of after building a model.

    Raises:
        glam_tf.refusal.Refused: `path` is a file, or cannot be created or written (names
            `flag`, the path and the file system's reason).
    """
    from glam_tf.refusal import Refused  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if exists(path) and not isdir(path):
        raise Refused(path, f"{flag} is a file, not a directory",
                      "give a directory (or move the file away)")
    probe = temporary_path(join(path, ".write-probe"))
    try:
        makedirs(path)
        with open_file(probe, "wb") as f:
            f.write(b"probe")
        remove(probe)
    except OSError as e:
        raise Refused(path, f"{flag} cannot be written ({' '.join(str(e.strerror).split())})",
                      "make it writable for this user, or choose another directory") from e


# ---------------------------------------------------------------------------- refusing


class UnreachablePathError(ValueError):
    """A path whose file system is unknown to TensorFlow or does not answer, or that only
    looks like a URL: `flag`, `path`, what is wrong (`problem`) and what to do (`advice`)."""

    def __init__(self, flag: str, path: str, problem: str, advice: str):
        self.flag, self.path, self.problem, self.advice = flag, path, problem, advice
        super().__init__(f"--{flag}={path}: {problem}; {advice}")


# A first path component that starts like a URL: an RFC 3986 scheme and a colon.
_SCHEME_COLON = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def check_reachable(path, flag: str, *, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Refuses, in one line naming `flag` and `path`, a path TensorFlow cannot reach.

    A path whose first component starts with a scheme and a colon must be a URL
    (`scheme://...`) of a file system TensorFlow has: `gs:/bucket/x` (one slash), `s3:x` or
    `my-store://x` is refused instead of becoming a local folder named after the scheme
    (`./gs:/x` is that folder, if it is meant). `file://` URLs are refused too: the local
    path itself works everywhere. Other local paths pass (their own checks say what is
    missing). For a URL, asks its file system whether `path` exists, in a thread bounded by
    `timeout_s` (TensorFlow's GCS client retries a silent network for minutes): an unknown
    scheme, missing credentials, no network or no answer in time raise
    `UnreachablePathError`, one wording per kind whatever the program.
    """
    path = os.fspath(path)
    match = _SCHEME_COLON.match(path)
    kind = scheme(path)
    if match and not kind:
        name = match.group(1)
        raise UnreachablePathError(
            flag, path, f"starts like a URL ({name}:) but is not one (a URL is "
            f"{name}://<bucket>/<path>)", f"write {name}://... for that store, or "
            f"./{path} for a local folder of that name")
    if kind == "file":
        raise UnreachablePathError(flag, path, "file:// URLs are not taken",
                                   f"give the local path itself ({path[len('file://'):]})")
    if is_local(path):
        _check_parent_steps(path, flag)
        return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(_gfile().exists, path)
    pool.shutdown(wait=False)
    try:
        future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise UnreachablePathError(
            flag, path, f"the {kind}:// file system gave no answer in {timeout_s:.0f} s",
            "check the network route to it (or whether it is down), then rerun") from None
    except tf.errors.UnimplementedError:
        raise UnreachablePathError(
            flag, path, f"TensorFlow has no file system for {kind}:// (it knows local paths, "
            "ram:// and gs://)", "use one of those, or install the plug-in that registers "
            f"{kind}:// (such as tensorflow-io)") from None
    except tf.errors.OpError as e:
        raise UnreachablePathError(flag, path, f"cannot reach it ({_first_line(e.message)})",
                                   _advice(kind, e.message)) from None


def _check_parent_steps(path: str, flag: str) -> None:
    """Refuses a local path with a `..` after a folder that does not exist: the system
    refuses `missing/../x` while TensorFlow's file system shortens it to `x`, so a program
    would write where its own checks cannot look (and leave temporary files there)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        before = "/".join(parts[:i])
        if part == ".." and before not in ("", ".", "..") and not os.path.isdir(before):
            raise UnreachablePathError(
                flag, path, f"goes through {before}, which is not an existing folder, before "
                "'..'", f"give the path without that step ({os.path.normpath(path)})")


def _first_line(message: str) -> str:
    return " ".join(message.split())


def _advice(kind: str, message: str) -> str:
    """What to do about an object store that answered `message`."""
    text = message.lower()
    if "resolve host" in text or "couldn't connect" in text or "could not connect" in text:
        return (f"no network: the {kind}:// service's host cannot be reached; check the "
                "network route to it, then rerun")
    if "401" in text or "403" in text or "permission" in text or "credentials" in text:
        return ("no credentials allowed to read it: run `gcloud auth application-default "
                "login` or set GOOGLE_APPLICATION_CREDENTIALS, then rerun")
    return f"check the path, the network and the credentials for {kind}://, then rerun"
