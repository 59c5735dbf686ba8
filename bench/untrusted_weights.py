"""Peak memory and time of loading a ResNet50 backbone from good and hostile weights files.

Writes a keras.applications-layout ResNet50 file (random weights, 95 MB) and variants of it
that a careless or hostile source could hand over: a bias stored in another file (HDF5
external storage) or replaced by a soft link, a kernel declared 2^28 or 2^31 floats
(chunked and compressed: a few kB on disk), a NaN in a kernel, a float64 bias, an empty
and a truncated file. Each is loaded by `build_backbone("resnet50", <file>)` in a fresh
process; the figure is that process's peak resident memory (VmHWM), so a refused file
should cost no more than the good one.

    python bench/untrusted_weights.py --work_dir=/tmp/untrusted [--cases=good,huge31]

Prints the machine line, then one line per case: outcome, seconds, VmHWM in MB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from absl import app, flags

import harness  # (this folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = ("good", "float64", "huge28", "huge31", "external", "soft", "nan", "empty",
         "truncated")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Folder for the files.", required=True)
_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {', '.join(CASES)}.")

KERNEL, BIAS = "conv1_conv/conv1_conv/kernel:0", "conv1_conv/conv1_conv/bias:0"
# One case in a fresh process: load, then print outcome, seconds and VmHWM as JSON.
CHILD = """
import json, sys, time
from glam_tf.model.backbone import build_backbone
start = time.perf_counter()
try:
    build_backbone("resnet50", sys.argv[1])
    outcome = "loaded"
except Exception as e:  # the refusal's message is the outcome
    outcome = f"{type(e).__name__}: {e}"
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start,
                  "vmhwm_mb": int(status) // 1024}))
"""


def write_good(path: str) -> None:
    """A random ResNet50 in the layout keras.applications downloads (legacy save_weights)."""
    import h5py  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(include_top=False, weights=None,
                                        input_shape=(None, None, 3))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        for layer in model.layers:
            group = f.create_group(layer.name)
            variables = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for name, variable in zip(names, variables):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(variable))


def write_variant(good: str, case: str, folder: str) -> str:
    """The file of `case`, derived from the good one."""
    import h5py  # pylint: disable=import-outside-toplevel

    path = os.path.join(folder, f"{case}.h5")
    if case == "empty":
        open(path, "wb").close()  # noqa: SIM115
        return path
    if case == "truncated":
        with open(good, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read(os.path.getsize(good) // 2))
        return path
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        if case in ("huge28", "huge31"):
            del f[KERNEL]
            f.create_dataset(KERNEL, shape=(2 ** int(case[-2:]),), dtype="float32",
                             chunks=(1 << 20,), compression="gzip")
        elif case == "external":
            other = os.path.join(folder, "other_file.bin")
            with open(other, "wb") as g:
                g.write(b"S" * 256)
            del f[BIAS]
            f.create_dataset(BIAS, shape=(64,), dtype="float32", external=[(other, 0, 256)])
        elif case == "soft":
            del f[BIAS]
            f[BIAS] = h5py.SoftLink("/conv1_bn/conv1_bn/beta:0")
        elif case == "nan":
            kernel = f[KERNEL][()]
            kernel.flat[0] = np.nan
            f[KERNEL][...] = kernel
        elif case == "float64":
            bias = f[BIAS][()].astype("float64")
            del f[BIAS]
            f.create_dataset(BIAS, data=bias)
    return path


def main(argv):
    del argv
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"--cases: unknown {unknown}; choose from {CASES}")
    folder = _WORK_DIR.value
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "good.h5")
    if not os.path.exists(good):
        write_good(good)
    print(harness.header(), flush=True)
    for case in _CASES.value:
        path = good if case == "good" else write_variant(good, case, folder)
        proc = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                              check=False)
        if proc.returncode:
            print(f"{case}: the loading process failed ({proc.returncode}): "
                  f"{proc.stderr[-500:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{case:10s} {result['vmhwm_mb']:6d} MB {result['seconds']:6.1f} s  "
              f"{result['outcome'][:200]}", flush=True)


if __name__ == "__main__":
    app.run(main)
