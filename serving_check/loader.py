"""Builds serving_check.c against the installed TensorFlow wheel and runs it on an export.

serving_check answers a SavedModel's signatures through TensorFlow's C loader
(TF_LoadSessionFromSavedModel, tag "serve"), as TF Serving does, without Python in the
serving process. The binary is compiled once per (source, TensorFlow install, compiler) and
cached under build/serving_check/<hash>/ (tests/test_serving_check.py and
bench/serving_warmup.py share it); `python -m serving_check.loader` builds it and prints
its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import subprocess
import tempfile
from typing import Optional

import numpy as np

from glam_tf import cpu

SOURCE = pathlib.Path(__file__).resolve().with_name("serving_check.c")
CACHE_DIR = SOURCE.parents[1] / "build" / "serving_check"
LIBRARIES = ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2")


compiler = cpu.c_compiler  # $CC, else gcc, else cc; None when there is none


def tensorflow_dir() -> pathlib.Path:
    """The installed tensorflow package folder (holds include/ and the shared libraries)."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tensorflow package is not installed in this Python")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def build(cache_dir: os.PathLike = CACHE_DIR) -> pathlib.Path:
    """Compiles serving_check.c (once per source, TF install and compiler); returns the binary.

    Raises:
        FileNotFoundError: no C compiler, or the TF wheel lacks its headers or libraries.
        RuntimeError: the compiler failed (its output in the message).
    """
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler found ($CC, gcc or cc); install gcc "
                                "(apt-get install gcc) to build serving_check")
    tf_dir = tensorflow_dir()
    needed = [tf_dir / "include" / "tensorflow" / "c" / "c_api.h"] + [tf_dir / n for n in LIBRARIES]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the TensorFlow wheel at {tf_dir} lacks {', '.join(missing)}")
    key = hashlib.sha256(SOURCE.read_bytes() + f"\0{tf_dir}\0{cc}".encode()
                         + (tf_dir / LIBRARIES[0]).stat().st_mtime_ns.to_bytes(8, "little"))
    binary = pathlib.Path(cache_dir) / key.hexdigest()[:16] / "serving_check"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f".serving_check.{os.getpid()}")   # renamed when complete
    command = [cc, "-O2", "-std=gnu11", "-Wall", f"-I{tf_dir / 'include'}",
               str(SOURCE), "-o", str(partial), f"-L{tf_dir}",
               *(f"-l:{name}" for name in LIBRARIES), f"-Wl,-rpath,{tf_dir}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building serving_check failed ({' '.join(command)}):\n"
                           f"{proc.stderr[-4000:]}")
    partial.rename(binary)
    return binary


@dataclasses.dataclass
class Answer:
    """One request's result: outputs (key -> array) or the model's refusal message."""
    signature: str
    outputs: dict
    error: Optional[str]
    ms: float


@dataclasses.dataclass
class Session:
    """What one serving_check process reported: load and warm-up times, the answers."""
    load_ms: float
    warmup: Optional[tuple]          # (requests replayed, ms) with warmup=True
    answers: list


def _input_args(folder: pathlib.Path, index: int, inputs: dict) -> list:
    """NAME=FILE.npy per array input, NAME=bytes:FILE,... per list of encoded strings."""
    args = []
    for j, (name, value) in enumerate(inputs.items()):
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], bytes):
            files = []
            for k, data in enumerate(value):
                files.append(folder / f"in_{index}_{j}_{k}.bin")
                files[-1].write_bytes(data)
            args.append(f"{name}=bytes:{','.join(map(str, files))}")
        else:
            path = folder / f"in_{index}_{j}.npy"
            np.save(path, np.ascontiguousarray(value))
            args.append(f"{name}={path}")
    return args


def run(binary: os.PathLike, export_dir: os.PathLike, requests=(), *, prediction_logs=(),
        warmup: bool = False, timeout: float = 900) -> Session:
    """Loads `export_dir` in one serving_check process and answers the requests in order.

    Args:
        binary: from build().
        requests: (signature name, {input name: numpy array | list of bytes}) pairs.
        prediction_logs: TFRecord files of PredictionLog protos, answered after `requests`.
        warmup: replay the export's assets.extra/tf_serving_warmup_requests first.

    Raises:
        RuntimeError: serving_check failed (a usage or load error; its stderr in the message).
    """
    with tempfile.TemporaryDirectory(prefix="serving_check_") as tmp:
        folder = pathlib.Path(tmp)
        args = [str(binary), os.fspath(export_dir), str(folder)] + (["--warmup"] if warmup else [])
        for i, (signature, inputs) in enumerate(requests):
            args += ["--run", signature, *_input_args(folder, i, inputs)]
        for path in prediction_logs:
            args += ["--requests", os.fspath(path)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"serving_check failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        load_ms, warmup_result, answers = None, None, []
        for line in proc.stdout.splitlines():
            words = line.split()
            if words[0] == "load":
                load_ms = float(words[1])
            elif words[0] == "warmup":
                warmup_result = (int(words[1]), float(words[2]))
            elif words[0] == "request":
                prefix = f"request_{words[1]}."
                outputs = {p.name[len(prefix):-4]: np.load(p)
                           for p in sorted(folder.glob(prefix + "*.npy"))}
                error_file = folder / (prefix + "error.txt")
                error = error_file.read_text() if error_file.exists() else None
                answers.append(Answer(words[2], outputs, error, float(words[4])))
        return Session(load_ms, warmup_result, answers)


if __name__ == "__main__":
    print(build())
