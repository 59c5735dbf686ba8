"""Cost of the GLAM module at inference: descriptor time with GLAM vs the baseline.

Both models are built with build_descriptor_model on the same backbone architecture and the
same backbone weights (random init, no download), and run inside a tf.function whose input
signature has None batch/height/width, as the export does. Timed through bench/harness.py
in one process: --warmup untimed calls of each, then --runs rounds with the order rotated
(GLAM, baseline; baseline, GLAM; ...); medians compared, with the per-round spread and the
machine (CPU, instruction-set level, load).

    .venv/bin/python bench/model_overhead.py [--height 768 --width 1024 --runs 7]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (this folder)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from glam_tf.model import GlobalChannelAttention, ModelConfig, build_descriptor_model  # noqa: E402


def glam_module_gflops(h, w, c=2048, cp=256, n_dilations=3,
                       series_terms=GlobalChannelAttention.SERIES_TERMS):
    """Multiply-accumulates (x2 = FLOPs) of the global+local module on an h x w x c map."""
    hw = h * w
    macs = hw * c * cp                                   # local: 1x1 reduce
    macs += n_dilations * hw * 9 * cp * cp               # dilated 3x3 convs
    macs += hw * cp * cp + hw * (n_dilations + 1) * cp   # 1x1 branch, 1x1 -> 1
    macs += 2 * hw * c * series_terms                    # global channel: V k^n, (.) q^n
    macs += 3 * hw * c * cp + hw * cp * c                # Q, K, V, out 1x1 convs
    macs += 2 * hw * hw * cp                             # K.Q logits and a^T V
    return 2 * macs / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--variant", default="global+local")
    parser.add_argument("--reduced_channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    print(harness.header(), flush=True)

    common = dict(backbone=args.backbone, weights="none",
                  reduced_channels=args.reduced_channels)
    glam = build_descriptor_model(ModelConfig(variant=args.variant, **common))
    base = build_descriptor_model(ModelConfig(variant="baseline", **common))
    base.get_layer("backbone").set_weights(glam.get_layer("backbone").get_weights())
    base.get_layer("head").set_weights(glam.get_layer("head").get_weights())
    print(f"params: {args.variant} {glam.count_params():,}, baseline {base.count_params():,}, "
          f"module {glam.get_layer('glam').count_params():,}")

    spec = [tf.TensorSpec([None, None, None, 3], tf.float32)]
    fns = {
        args.variant: tf.function(lambda x: glam(x, training=False), input_signature=spec),
        "baseline": tf.function(lambda x: base(x, training=False), input_signature=spec),
    }
    image = tf.constant(np.random.default_rng(0).uniform(
        0, 255, (1, args.height, args.width, 3)).astype("float32"))
    times = harness.compare({name: (lambda fn=fn: fn(image).numpy()) for name, fn in fns.items()},
                            rounds=args.runs, warmup=args.warmup, log=print)
    med = {name: t.median * 1e3 for name, t in times.items()}
    h, w = -(-args.height // 32), -(-args.width // 32)
    print(f"image {args.width}x{args.height} (feature map {w}x{h}), backbone {args.backbone}, "
          f"device {'GPU' if tf.config.list_physical_devices('GPU') else 'CPU'}")
    print(f"GLAM module ~{glam_module_gflops(h, w, cp=args.reduced_channels):.1f} GFLOPs "
          f"(global+local at this size)")
    print(f"median {args.variant}: {med[args.variant]:.1f} ms")
    print(f"median baseline: {med['baseline']:.1f} ms")
    print(f"ratio {args.variant} / baseline: {harness.ratio(times[args.variant], times['baseline'])}")
    print(harness.header())


if __name__ == "__main__":
    main()
