"""Apache Beam runner options for the conversion and extraction pipelines.

Both `build_gldv2_main.py` and `eval_main.py --stage=extract` run one Beam pipeline. Any
flag the program does not define is handed to Beam's `PipelineOptions`, so the same
command runs on a laptop or a cluster:

  (nothing)                          DirectRunner, 2 worker processes on this machine
  --direct_num_workers=8             DirectRunner, 8 worker processes
  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
  --runner=FlinkRunner --flink_master=host:8081 --environment_type=LOOPBACK
  --runner=SparkRunner --spark_master_url=spark://host:7077

A flag that is neither the program's nor a Beam option is an error (a typo would otherwise
be dropped silently by Beam). PrismRunner downloads a binary when it starts: not usable
offline.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from glam_tf import files


# The embedded default: DirectRunner's multi-process mode on the local cores.
LOCAL_DEFAULTS = ("--runner=DirectRunner", "--direct_num_workers=2",
                  "--direct_running_mode=multi_processing")
REPO_ROOT = files.dirname(files.dirname(files.absolute(__file__)))


def parse_flags_keep_beam_args(argv):
    """An absl `flags_parser` for `app.run`: parses the program's flags, keeps the rest.

    Returns:
      `[argv[0], *unknown]`: the flags absl does not know (Beam's, checked later by
      `pipeline_options`).
    """
    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to "
                         "see help on flags.\n")
        sys.exit(1)


def unknown_beam_args(args) -> list:
    """The entries of `args` that no Beam `PipelineOptions` class defines."""
    from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top

    parser = po._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
    seen = {}
    for cls in po.PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    _, unknown = parser.parse_known_args(list(args))
    return unknown


def check_args(beam_args) -> None:
    """Raises ValueError naming the flags of `beam_args` that are no Beam option (cheap:
    for a program to fail before any heavy work)."""
    unknown = unknown_beam_args([str(a) for a in (beam_args or ())])
    if unknown:
        raise ValueError(
            f"unknown flag(s) {unknown}: neither this program's flags nor Apache Beam pipeline "
            "options (see `python -m apache_beam.examples.wordcount --help` for Beam's, "
            "--helpfull for this program's)")


def pipeline_options(beam_args=None, paths=None):
    """`PipelineOptions` from extra argv, on top of the local DirectRunner defaults.

    Args:
      beam_args: Beam flags (`["--runner=FlinkRunner", "--flink_master=..."]`), or None.
        Without `--runner`, the DirectRunner defaults apply (a later
        `--direct_num_workers` overrides theirs).
      paths: {flag name: path} the pipeline's workers read or write. A path on a file system
        that lives inside this process (`ram://`) makes the default runner the in-memory
        DirectRunner (one worker: this process); with worker processes or a cluster runner
        asked for, it is refused.

    Raises:
      ValueError: a flag that is no Beam option (named, with how to list them), or a
        process-local path with a runner whose workers cannot see it.
    """
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

    args = [str(a) for a in (beam_args or ())]
    check_args(args)
    in_process = {flag: path for flag, path in (paths or {}).items()
                  if path and files.scheme(path) in PROCESS_LOCAL_SCHEMES}
    if in_process:
        args = _in_process_args(args, in_process)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = list(LOCAL_DEFAULTS) + args
    if _is_direct(args):
        if any(a == "--num_workers" or a.startswith("--num_workers=") for a in args):
            raise ValueError(
                "--num_workers is Beam's worker count on Dataflow; the DirectRunner's worker "
                "processes are set with --direct_num_workers=N")
        # DirectRunner's worker processes unpickle our DoFns by module name: let them import
        # glam_tf from wherever the program was started.
        path = os.environ.get("PYTHONPATH", "")
        if REPO_ROOT not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, path) if p)
    return PipelineOptions(args)


PROCESS_LOCAL_SCHEMES = ("ram",)  # file systems only this process sees


def _in_process_args(args, in_process) -> list:
    """`args` made to run the pipeline inside this process (see `pipeline_options`)."""
    flag, path = next(iter(in_process.items()))
    mode = None
    for a in args:
        if a.startswith("--direct_running_mode="):
            mode = a.split("=", 1)[1]
    if not _is_direct(args) or mode not in (None, "in_memory"):
        raise ValueError(
            f"--{flag}={path} is on a file system that lives in this process only, which the "
            "workers of this Beam runner cannot see; run in this process "
            "(--direct_running_mode=in_memory) or put the data on a shared file system")
    if mode is None:
        args = args + ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return [a for a in args if not a.startswith("--direct_num_workers=")] + [
        "--direct_num_workers=1"]


def is_direct(options) -> bool:
    """Whether `PipelineOptions` run on the DirectRunner (Beam's default without --runner)."""
    from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top

    runner = options.view_as(StandardOptions).runner
    return runner is None or runner in _DIRECT


_DIRECT = ("DirectRunner", "direct", "BundleBasedDirectRunner")


def _is_direct(args) -> bool:
    runner = "DirectRunner"
    for i, a in enumerate(args):
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(args):
            runner = args[i + 1]
    return runner in _DIRECT


def counters(result, namespace) -> dict:
    """{name: committed value} of the Beam counters of `namespace` in a pipeline result."""
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top

    out = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        name = c.key.metric.name
        value = c.committed if c.committed is not None else c.attempted
        out[name] = out.get(name, 0) + int(value or 0)
    return out


def distributions(result, namespace) -> dict:
    """{name: {count, sum, min, max}} of the Beam distributions of `namespace` in a result."""
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top

    out = {}
    for d in result.metrics().query(MetricsFilter().with_namespace(namespace))["distributions"]:
        v = d.committed if d.committed is not None else d.attempted
        if v is None or not v.count:
            continue
        o = out.setdefault(d.key.metric.name, {"count": 0, "sum": 0, "min": v.min, "max": v.max})
        o["count"] += v.count
        o["sum"] += v.sum
        o["min"], o["max"] = min(o["min"], v.min), max(o["max"], v.max)
    return out
