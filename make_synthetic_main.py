"""Generates the synthetic landmarks set (GLDv2-layout training split, revisited-layout test).

  python make_synthetic_main.py --root=data/synthetic
  python build_gldv2_main.py --gldv2_root=data/synthetic --output_dir=data/synthetic/tfrecords

Writes <root>/train_clean.csv + <root>/train/a/b/c/<id>.jpg and <root>/synth/jpg/*.jpg +
<root>/synth/gnd_synth.pkl (evaluate with dataset name "synth"). Idempotent unless --force.
"""

import shutil

from absl import app, flags

from glam_tf.data import synthetic

_ROOT = flags.DEFINE_string("root", None, "Output folder.", required=True)
_TRAIN_LANDMARKS = flags.DEFINE_integer("num_train_landmarks", 100, "Training classes.")
_IMAGES = flags.DEFINE_integer("images_per_landmark", 15, "Training photos per class.")
_TEST_LANDMARKS = flags.DEFINE_integer("num_test_landmarks", 10, "Landmarks with queries.")
_QUERIES = flags.DEFINE_integer("queries_per_landmark", 5, "Queries per test landmark.")
_DB = flags.DEFINE_list("database_per_landmark", ["5", "4", "3"],
                        "easy,hard,junk database photos per test landmark.")
_DISTRACTORS = flags.DEFINE_integer("num_distractor_landmarks", 20,
                                    "Landmarks only in the test database.")
_PER_DISTRACTOR = flags.DEFINE_integer("images_per_distractor", 4, "Photos per distractor.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Longest photo side (x U(0.7, 1)).")
_PALETTE = flags.DEFINE_float("palette_variation", 1.0,
                              "How far each photo's building colours move from its own "
                              "palette towards a random one, in [0, 1] (1: colour is no cue).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; same seed, same bytes.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes.")
_FORCE = flags.DEFINE_bool("force", False, "Delete <root> first and regenerate.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        database = tuple(int(v) for v in _DB.value)
    except ValueError:
        raise app.UsageError(
            f"--database_per_landmark must be three integers easy,hard,junk, got {_DB.value}"
        ) from None
    if _FORCE.value:
        shutil.rmtree(_ROOT.value, ignore_errors=True)
    try:
        summary = synthetic.generate_if_absent(
            _ROOT.value, num_train_landmarks=_TRAIN_LANDMARKS.value,
            images_per_landmark=_IMAGES.value, num_test_landmarks=_TEST_LANDMARKS.value,
            queries_per_landmark=_QUERIES.value, database_per_landmark=database,
            num_distractor_landmarks=_DISTRACTORS.value,
            images_per_distractor=_PER_DISTRACTOR.value, image_size=_IMAGE_SIZE.value,
            palette_variation=_PALETTE.value, seed=_SEED.value, num_workers=_NUM_WORKERS.value)
    except ValueError as e:  # a flag out of range, or a set made there with other flags
        raise app.UsageError(str(e)) from None
    print(f"{summary.train_images} training photos of {summary.train_landmarks} landmarks: "
          f"{summary.train_csv}")
    print(f"{summary.num_queries} queries, {summary.num_database} database photos: "
          f"{summary.gnd_path}")


if __name__ == "__main__":
    app.run(main)
