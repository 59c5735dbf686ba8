"""First-request latency after load through TensorFlow's C loader, with and without warm-up.

Exports a descriptor model (random weights: speed does not depend on them) with its TF
Serving warm-up file, builds serving_check (serving_check/loader.py), then runs --rounds
rounds of two fresh serving_check processes each: one loads the export and answers a
global_descriptor request on a real photo (the first request pays for the session's first
run of the signature), the other replays the warm-up file after loading (as TF Serving does
before a version takes traffic) and then answers the same request. The two legs alternate
their order from round to round, so drifting load from other processes falls on both. Each
process then answers the same request a second time (the steady-state cost, what warm-up
can at best bring the first request down to). Reported: per leg the median first-request
time (and the warm-up replay's time), the second requests' median, and the ratio cold /
warm per round: median, min and max.

  python bench/serving_warmup.py                                  # resnet50, 512 px
  python bench/serving_warmup.py --backbone=resnet101 --image_size=1024 --rounds=5
"""

import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from glam_tf.export import serving  # noqa: E402
from glam_tf.model import BACKBONES, ModelConfig, build_descriptor_model  # noqa: E402
from serving_check import loader  # noqa: E402

FLAGS = flags.FLAGS
PHOTO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "oxford_query_crops" / "ashmolean_3.jpg"


def define_flags():
    flags.DEFINE_enum("backbone", "resnet50", BACKBONES, "Backbone of the exported model.")
    flags.DEFINE_integer("image_size", 512, "The export's max_image_size (px).")
    flags.DEFINE_integer("rounds", 4, "Rounds of (cold, warm) process pairs.")
    flags.DEFINE_string("photo", str(PHOTO), "The request's image (any photo).")


def machine() -> str:
    """CPU model, family/model, the instruction-set level and the load, from /proc."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    cpu_flags = set(info.get("flags", "").split())
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"),
                                   ("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_tile"))
           if flag in cpu_flags] or ["no AVX2"]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family')} "
            f"model {info.get('model')}), {'/'.join(isa)}, {os.cpu_count()} CPUs, "
            f"load average {' '.join(load)}")


def leg(binary, export, image, warm):
    """A fresh serving_check process answering the same request twice:
    (first request ms, second request ms, warm-up replay ms or None)."""
    request = ("global_descriptor", {"input_image": image})
    session = loader.run(binary, export, [request, request], warmup=warm)
    for answer in session.answers:
        if answer.error:
            raise RuntimeError(answer.error)
    first, second = session.answers
    return first.ms, second.ms, session.warmup[1] if warm else None


def main(argv):
    del argv
    if not pathlib.Path(FLAGS.photo).is_file():
        raise app.UsageError(f"--photo={FLAGS.photo!r} is not a file")
    if loader.compiler() is None:
        raise app.UsageError("no C compiler found ($CC, gcc or cc): install gcc")
    image = np.asarray(Image.open(FLAGS.photo).convert("RGB"))
    binary = loader.build()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_descriptor_model(ModelConfig(backbone=FLAGS.backbone, weights="none"))
        export = serving.export_saved_model(model, os.path.join(tmp, "export"),
                                            max_image_size=FLAGS.image_size)
        cold, warm, steady, replay, ratios = [], [], [], [], []
        for r in range(FLAGS.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {warm_leg: leg(binary, export, image, warm_leg) for warm_leg in order}
            cold.append(got[False][0])
            warm.append(got[True][0])
            steady += [got[False][1], got[True][1]]
            replay.append(got[True][2])
            ratios.append(cold[-1] / warm[-1])
            logging.info("round %d/%d (%s first): first request cold %.0f ms, after replay "
                         "%.0f ms (replay %.0f ms); second requests %.0f, %.0f ms", r + 1,
                         FLAGS.rounds, "warm" if order[0] else "cold", cold[-1], warm[-1],
                         replay[-1], got[False][1], got[True][1])
    print(f"machine: {machine()}")
    print(f"TF {tf.__version__}, {FLAGS.backbone} (weights none), max_image_size "
          f"{FLAGS.image_size}, photo {pathlib.Path(FLAGS.photo).name} {image.shape[1]}x"
          f"{image.shape[0]}, {FLAGS.rounds} rounds, legs alternating")
    print(f"first global_descriptor request, no warm-up:   median {statistics.median(cold):8.0f} ms")
    print(f"first global_descriptor request, after replay: median {statistics.median(warm):8.0f} ms"
          f" (replay of 4 requests: median {statistics.median(replay):.0f} ms)")
    print(f"second request of the same process (both legs):  median "
          f"{statistics.median(steady):8.0f} ms, min {min(steady):.0f}, max {max(steady):.0f}")
    print(f"ratio cold / warm: median {statistics.median(ratios):.1f}x, min {min(ratios):.1f}x, "
          f"max {max(ratios):.1f}x over {len(ratios)} rounds")


if __name__ == "__main__":
    define_flags()
    app.run(main)
