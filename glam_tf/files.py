"""Crash-safe file writes (temporary file, fsync, rename) for the converter, the synthetic
generator, the training run and the evaluator."""

import json
import os
import socket
import uuid


def temporary_path(path: str) -> str:
    """`{path}.tmp-{host}-{pid}-{random}`: unique across hosts, processes and attempts, so
    two writers of the same path on a shared disk never write into one temporary file (the
    last rename wins, whole)."""
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return f"{path}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex}"


def atomic_write(path: str, write) -> None:
    """Calls `write(f)` on a temporary binary file (`temporary_path`), syncs it and renames
    it to `path`: a reader (or a crash) never sees half a file. The temporary file is
    removed when `write` fails.
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """`obj` as indented, key-sorted JSON to `path`, through `atomic_write`."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def ensure_writable_dir(path: str, flag: str) -> None:
    """Creates directory `path` if needed and proves it writable with a probe file.

    Run before heavy work, so a program pointed at a file, a read-only folder or a full
    disk refuses at once (glam_tf.refusal) instead of after building a model.

    Raises:
        glam_tf.refusal.Refused: `path` is a file, or cannot be created or written (names
            `flag`, the path and the file system's reason).
    """
    import tensorflow as tf  # noqa: PLC0415 (the programs that call this use it anyway)

    from glam_tf.refusal import Refused  # noqa: PLC0415

    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
        raise Refused(path, f"{flag} is a file, not a directory",
                      "give a directory (or move the file away)")
    probe = temporary_path(os.path.join(path, ".write-probe"))
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "wb") as f:
            f.write(b"probe")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        reason = e.strerror if isinstance(e, OSError) else " ".join(e.message.split())
        raise Refused(path, f"{flag} cannot be written ({reason})",
                      "make it writable for this user, or choose another directory") from e
