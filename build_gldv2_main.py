"""Converts Google Landmarks v2 (as downloaded) into sharded DELG-keyed TFRecords.

  python build_gldv2_main.py --gldv2_root=/data/gldv2 --output_dir=/data/gldv2_tfrecords \
      --validation_fraction=0.0 [Beam flags]

One Apache Beam pipeline (glam_tf.data.gldv2.convert_gldv2). Without Beam flags it runs on
the DirectRunner with 2 worker processes on this machine (--direct_num_workers=8 for more);
any other flag goes to Beam, e.g. --runner=DataflowRunner --project=P --region=R
--temp_location=gs://B/tmp, --runner=FlinkRunner --flink_master=host:8081, or
--runner=SparkRunner --spark_master_url=spark://host:7077 (docs/scale-out.md, "Runners").
A flag that is neither this program's nor Beam's is an error.

Reads <gldv2_root>/train_clean.csv (or train.csv) and <gldv2_root>/train/<a>/<b>/<c>/<id>.jpg.
Images the csv lists but absent refuse the run in one line (exit 2; missing_by_tar.txt in
--output_dir lists them with their tar) unless --allow_missing. --exclude_landmarks=FILE
leaves the landmark ids listed there out (summary.json records the file's sha256).
Re-running with the same flags resumes: finished shards are kept. Train with
--train_file_pattern=<output_dir>/train-*-of-*.tfrecord; label_map.csv maps class -> landmark
id. A missing folder or file is one line on stderr (exit 2), not a traceback.
"""

from absl import flags, logging

from glam_tf import beam_options, files, refusal
from glam_tf.config import settings
from glam_tf.data import gldv2

_ROOT = flags.DEFINE_string("gldv2_root", None, "GLDv2 folder (csv + train/).", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the TFRecords go.", required=True)
_CSV = flags.DEFINE_string("csv", None, "csv other than <root>/train_clean.csv / train.csv.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Image root other than <root>/train.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Training shards; 0 = ~10k images each.")
_NUM_VAL_SHARDS = flags.DEFINE_integer("num_validation_shards", 0,
                                       "Validation shards; 0 = ~10k images each.")
_VAL_FRACTION = flags.DEFINE_float("validation_fraction", 0.0,
                                   "Per-class fraction held out as validation, in [0, 1).")
_SEED = flags.DEFINE_integer("seed", 0, "Shard shuffle and validation split seed.")
_FULL_DECODE = flags.DEFINE_bool("full_decode", True,
                                 "Decode every image to catch truncated files.")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False,
                                   "Convert even when images the csv lists are absent (counted "
                                   "in summary.json); else the run refuses, naming them.")
_EXCLUDE = flags.DEFINE_string("exclude_landmarks", None,
                               "File of landmark ids (one per line, '#' comments) left out, e.g. "
                               "those that also appear in the test sets.")

def main(argv):
    try:
        with refusal.refusals("build_gldv2_main", verbose=flags.FLAGS.verbosity >= 1):
            for flag in (_ROOT, _OUTPUT_DIR, _CSV, _IMAGE_DIR, _EXCLUDE):
                settings.reachable(flag.name, flag.value)
            files.ensure_writable_dir(_OUTPUT_DIR.value, "--output_dir")  # before any image is read
            summary = gldv2.convert_gldv2(
                _ROOT.value, _OUTPUT_DIR.value, csv_path=_CSV.value,
                image_dir=_IMAGE_DIR.value, num_shards=_NUM_SHARDS.value,
                num_validation_shards=_NUM_VAL_SHARDS.value,
                validation_fraction=_VAL_FRACTION.value, seed=_SEED.value,
                full_decode=_FULL_DECODE.value, allow_missing=_ALLOW_MISSING.value,
                exclude_landmarks=_EXCLUDE.value, beam_args=argv[1:])
    except (ValueError, FileNotFoundError) as e:
        settings.exit_with_usage_error("build_gldv2_main", e)
    print(f"written: {summary.total_written} (train {summary.written['train']}, validation "
          f"{summary.written['validation']}); missing: {len(summary.missing)}; undecodable: "
          f"{len(summary.undecodable)}; classes: {summary.num_classes}")
    if summary.missing_by_tar:
        print(f"missing by tar (--allow_missing): {summary.missing_by_tar}")
    if summary.excluded:
        ex = summary.excluded
        print(f"left out: {len(ex['landmarks_left_out'])} landmarks ({ex['images_left_out']} "
              f"images) of the {ex['landmarks_listed']} in {ex['file']} (sha256 {ex['sha256']})")
    print(f"train files: {summary.train_pattern}")
    print(f"label map:   {summary.label_map_path}")
    print(f"counters of this run: {summary.counters}")
    logging.info("done")

if __name__ == "__main__":
    refusal.run(main, "build_gldv2_main",
                flags_parser=beam_options.parse_flags_keep_beam_args)
