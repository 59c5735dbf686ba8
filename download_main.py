"""Downloads GLDv2 and the retrieval test sets, verified and resumable (glam_tf.data.download).

  python download_main.py --datasets=gldv2_train_clean,roxford5k,rparis6k --output_dir=data
  python build_gldv2_main.py --gldv2_root=data/gldv2 --output_dir=data/gldv2_tfrecord
  python eval_main.py --data_root=data ...

Writes <output_dir>/gldv2/ (csv, train/<a>/<b>/<c>/<id>.jpg), <output_dir>/<test set>/ and
download_manifest.json. Rerunning the same command fetches only what is missing or damaged
(an interrupted file continues where it stopped). A file that cannot be fetched, verified or
safely extracted, or a full disk, is one line on stderr (exit 3); a bad flag exits 2.
"""

from absl import app, flags, logging

from glam_tf import files, refusal
from glam_tf.config import settings
from glam_tf.data import download

_DATASETS = flags.DEFINE_list("datasets", None, "Any of " + ", ".join(download.DATASETS) + ".",
                              required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the datasets go (any "
                                  "tf.io.gfile path).", required=True)
_DOWNLOAD_DIR = flags.DEFINE_string("download_dir", "", "Local folder for the archives while "
                                    "they are fetched; '' = <output_dir>/downloads (a private "
                                    "scratch folder when --output_dir is remote).")
_PARALLEL = flags.DEFINE_integer("parallel", 4, "Files fetched at once.")
_TRIES = flags.DEFINE_integer("tries", 5, "Attempts per file without progress (and checksum "
                              "failures) before refusing it.")
_BACKOFF = flags.DEFINE_float("backoff_s", 2.0, "First wait before a retry; doubled each "
                              "time (at most 60 s).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 60.0, "A connection silent this long is retried.")
_MAX_MEMBER = flags.DEFINE_integer("max_member_bytes", download.DEFAULT_MAX_MEMBER_BYTES,
                                   "Largest archive member extracted; a larger one refuses "
                                   "the archive.")
_KEEP = flags.DEFINE_bool("keep_archives", False, "Keep the archives after extraction.")
_BASE_URL = flags.DEFINE_string("base_url", "", "Serve every host from <base_url>/<host key> "
                                "(host keys: " + ", ".join(download.HOSTS) + ").")
_MIRROR = flags.DEFINE_multi_string("mirror", [], "HOST_KEY=URL: one host from a mirror.")
_GLDV2_TARS = flags.DEFINE_string("gldv2_tars", f"0-{download.GLDV2_TARS - 1}",
                                  "GLDv2 train tars to fetch, e.g. 0-9,42.")
_R1M_TARS = flags.DEFINE_string("revisitop1m_tars", f"1-{download.REVISITOP1M_TARS}",
                                "revisitop1m tars to fetch, e.g. 1-10.")
_LOG_EVERY = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress lines.")


def _config() -> download.DownloadConfig:
    mirrors = []
    for item in _MIRROR.value:
        host, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"--mirror={item!r} must be HOST_KEY=URL")
        mirrors.append((host, url))
    return download.DownloadConfig(
        datasets=tuple(_DATASETS.value), output_dir=_OUTPUT_DIR.value,
        download_dir=_DOWNLOAD_DIR.value, parallel=_PARALLEL.value, tries=_TRIES.value,
        backoff_s=_BACKOFF.value, timeout_s=_TIMEOUT.value,
        max_member_bytes=_MAX_MEMBER.value, keep_archives=_KEEP.value,
        base_url=_BASE_URL.value, mirrors=tuple(mirrors),
        gldv2_tars=_parse("gldv2_tars", _GLDV2_TARS.value),
        revisitop1m_tars=_parse("revisitop1m_tars", _R1M_TARS.value),
        log_every_s=_LOG_EVERY.value)


def _parse(flag: str, text: str) -> tuple:
    try:
        return download.parse_ranges(text)
    except ValueError as e:
        raise ValueError(f"--{flag}: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _config()
        config.validate()
        settings.reachable("output_dir", config.output_dir)
        with refusal.refusals("download_main", verbose=flags.FLAGS.verbosity >= 1):
            files.ensure_writable_dir(config.output_dir, "--output_dir")
            summary = download.download(config)
    except ValueError as e:
        settings.exit_with_usage_error("download_main", e)
    print(f"fetched: {len(summary.fetched)} files ({summary.bytes_fetched} bytes); already "
          f"there: {len(summary.skipped)}")
    print(f"manifest: {summary.manifest_path}")
    logging.info("done")


if __name__ == "__main__":
    refusal.run(main, "download_main")
