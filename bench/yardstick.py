"""The colour histogram's mAP (no learning) on the splits of a synthetic set.

    python make_synthetic_main.py --root=data/synth_demo ...      # or a demo run's data
    python bench/yardstick.py --root=data/synth_demo --splits=synth_val,synth

Prints one Markdown row per split and region (whole photo, central half): Easy, Medium and
Hard mAP of glam_tf.eval.yardstick (8 x 8 x 8 RGB bins, square root, cosine; queries
cropped to their box; the revisited protocol). A split where these rows come near a trained
model's is one where colour and position, not structure, retrieve the landmark: settings
of the generator are chosen on the validation split (synth_val) so that they stay low.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPLITS = ("synth", "synth_val")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="Folder of the synthetic set.")
    parser.add_argument("--splits", default="synth_val",
                        help="Comma-separated revisited splits: synth (test), synth_val.")
    args = parser.parse_args(argv)
    args.splits = [s for s in args.splits.split(",") if s]
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        parser.error(f"--splits: unknown or empty {bad or args.splits}; use synth and/or "
                     "synth_val.")
    if not os.path.isdir(args.root):
        parser.error(f"--root={args.root!r}: no such folder; generate it with "
                     "make_synthetic_main.py.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from glam_tf.eval import yardstick  # noqa: PLC0415 (TensorFlow: after the flags)

    lines = ["| split | descriptor | Easy | Medium | Hard | seconds |", "|---|---|---|---|---|---|"]
    for split in args.splits:
        start = time.monotonic()
        results = yardstick.evaluate(args.root, split)
        seconds = time.monotonic() - start
        for region, result in results.items():
            lines.append(f"| {split} | {yardstick.LABELS[region]} | "
                         + " | ".join(f"{result[s]:.2f}" for s in ("easy", "medium", "hard"))
                         + f" | {seconds:.1f} |")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
