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
