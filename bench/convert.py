"""Benchmark: GLDv2 conversion, the Beam pipeline against the pre-Beam process pool.

Generates a synthetic GLDv2 layout (glam_tf.data.synthetic: the demo's 50 landmarks x 12
photos of 96 px by default, --landmarks / --per_landmark / --image_size for more), then
converts it, in one run and alternately, with
  beam:      glam_tf.data.gldv2.convert_gldv2 (DirectRunner, --direct_num_workers processes)
  reference: the pre-Beam converter (tests/gldv2_reference.py) with its spawned pool of
             --workers processes,
each into a fresh folder, and prints images/s of each and the ratio beam / reference (goal
>= 0.9). Both include their start-up (process spawn, TensorFlow import in the workers); the
outputs are checked byte-identical.

  .venv/bin/python bench/convert.py                       # the demo's 600 images
  .venv/bin/python bench/convert.py --landmarks=200 --per_landmark=25 --image_size=256
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
import gldv2_reference
from absl import logging

from glam_tf.config import SyntheticConfig
from glam_tf.data import gldv2, synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--landmarks", type=int, default=50)
    parser.add_argument("--per_landmark", type=int, default=12)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    import logging as std_logging  # pylint: disable=import-outside-toplevel
    std_logging.getLogger().setLevel(std_logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_convert_")
    config = SyntheticConfig(root=os.path.join(tmp, "gld"), num_train_landmarks=args.landmarks,
                             images_per_landmark=args.per_landmark, num_test_landmarks=1,
                             queries_per_landmark=1, num_distractor_landmarks=0,
                             image_size=args.image_size)
    made = synthetic.generate_if_absent(config, show_progress=False)
    n = made.train_images
    times = {"beam": [], "reference": []}
    for r in range(args.rounds):
        for kind in ("reference", "beam"):
            out = os.path.join(tmp, f"{kind}{r}")
            t0 = time.perf_counter()
            if kind == "beam":
                gldv2.convert_gldv2(config.root, out, num_shards=args.num_shards,
                                    beam_args=[f"--direct_num_workers={args.workers}"])
            else:
                gldv2_reference.convert_reference(config.root, out, num_shards=args.num_shards,
                                                  num_workers=args.workers)
            times[kind].append(time.perf_counter() - t0)
        same = gldv2_reference.output_files(os.path.join(tmp, f"beam{r}")) == \
            gldv2_reference.output_files(os.path.join(tmp, f"reference{r}"))
        if not same:
            raise SystemExit(f"round {r}: outputs differ")
    best = {k: min(v) for k, v in times.items()}
    result = {
        "images": n, "image_size": args.image_size, "workers": args.workers,
        "shards": args.num_shards, "seconds": {k: [round(x, 2) for x in v]
                                               for k, v in times.items()},
        "images_per_s": {k: round(n / v, 1) for k, v in best.items()},
        "ratio_beam_over_reference": round(best["reference"] / best["beam"], 3),
        "outputs_identical": True,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
