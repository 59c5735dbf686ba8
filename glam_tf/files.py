"""Crash-safe file writes (temporary file, fsync, rename) for the converter, the synthetic
generator, the training run and the evaluator."""

import json
import os


def atomic_write(path: str, write) -> None:
    """Calls `write(f)` on a temporary binary file, syncs it and renames it to `path`: a
    reader (or a crash) never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    """`obj` as indented, key-sorted JSON to `path`, through `atomic_write`."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
