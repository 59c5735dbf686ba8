"""Generates the synthetic landmarks set (GLDv2-layout training split, revisited-layout test).

  python make_synthetic_main.py --root=data/synthetic
  python build_gldv2_main.py --gldv2_root=data/synthetic --output_dir=data/synthetic/tfrecords

Writes <root>/train_clean.csv + <root>/train/a/b/c/<id>.jpg and <root>/synth/jpg/*.jpg +
<root>/synth/gnd_synth.pkl (evaluate with dataset name "synth"). Idempotent unless --force.
The flags are SyntheticConfig's settings (glam_tf.config), defined from its fields.
"""


from absl import app, flags

from glam_tf import files, refusal
from glam_tf.config import SettingError, SyntheticConfig, settings

settings.define_flags(SyntheticConfig)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes.")
_FORCE = flags.DEFINE_bool("force", False, "Delete --root first and regenerate.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = settings.from_flags(SyntheticConfig)
        config.validate()
        from glam_tf.data import synthetic  # noqa: PLC0415 (after the flags are checked)

        with refusal.refusals("make_synthetic_main", verbose=flags.FLAGS.verbosity >= 1):
            if _FORCE.value:
                files.rmtree(config.root)
            summary = synthetic.generate_if_absent(config, num_workers=_NUM_WORKERS.value)
    except (SettingError, ValueError) as e:  # a flag out of range, or a set made there with
        settings.exit_with_usage_error("make_synthetic_main", e)  # other flags
    print(f"{summary.train_images} training photos of {summary.train_landmarks} landmarks: "
          f"{summary.train_csv}")
    print(f"{summary.num_queries} queries, {summary.num_database} database photos: "
          f"{summary.gnd_path}")


if __name__ == "__main__":
    refusal.run(main, "make_synthetic_main")
