"""Benchmark: GLDv2 conversion, the Beam pipeline against the pre-Beam process pool.

Generates a synthetic GLDv2 layout (glam_tf.data.synthetic: the demo's 50 landmarks x 12
photos of 96 px by default, --landmarks / --per_landmark / --image_size for more), then
converts it, in one run, with
  beam:      glam_tf.data.gldv2.convert_gldv2 (DirectRunner, --direct_num_workers processes)
  reference: the pre-Beam converter (tests/gldv2_reference.py) with its spawned pool of
             --workers processes,
each call into a fresh folder, timed through bench/harness.py (one untimed warm-up call
each, then --rounds rounds, the order rotated each round), and prints images/s of each and
the speed ratio beam / reference (goal >= 0.9) with its per-round spread and the machine.
Both include their start-up (process spawn, TensorFlow import in the workers); every
output is checked byte-identical to the first reference output.

  .venv/bin/python bench/convert.py                       # the demo's 600 images
  .venv/bin/python bench/convert.py --landmarks=200 --per_landmark=25 --image_size=256
"""

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
import gldv2_reference
import harness
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
    outputs = []

    def leg(kind):
        def run():
            out = os.path.join(tmp, f"{kind}{len(outputs)}")
            outputs.append(out)
            if kind == "beam":
                gldv2.convert_gldv2(config.root, out, num_shards=args.num_shards,
                                    beam_args=[f"--direct_num_workers={args.workers}"])
            else:
                gldv2_reference.convert_reference(config.root, out, num_shards=args.num_shards,
                                                  num_workers=args.workers)
        return run

    print(harness.header(), flush=True)
    times = harness.compare({"reference": leg("reference"), "beam": leg("beam")},
                            rounds=args.rounds, warmup=1)
    want = gldv2_reference.output_files(outputs[0])
    for out in outputs[1:]:
        if gldv2_reference.output_files(out) != want:
            raise SystemExit(f"{out}: output differs from {outputs[0]}")
    speed = harness.ratio(times["reference"], times["beam"])
    result = {
        "images": n, "image_size": args.image_size, "workers": args.workers,
        "shards": args.num_shards, "seconds": {k: t.summary() for k, t in times.items()},
        "images_per_s": {k: round(n / t.median, 1) for k, t in times.items()},
        "ratio_beam_over_reference": speed.summary(),
        "outputs_identical": True, "machine": harness.machine(),
    }
    print(f"beam / reference speed: {speed}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
