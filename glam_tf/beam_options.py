"""Apache Beam runner options for the conversion and extraction pipelines.

Both `build_gldv2_main.py` and `eval_main.py --stage=extract` run one Beam pipeline. Any
flag the program does not define is handed to Beam's `PipelineOptions`, so the same
command runs on a laptop or a cluster:

  (nothing)                          the local runner, 2 worker processes on this machine
  --direct_num_workers=8             the local runner, 8 worker processes
  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
      [--sdk_container_image=IMAGE]
  --runner=FlinkRunner --flink_master=host:8081 --environment_type=DOCKER
      --environment_options=docker_container_image=IMAGE
  --runner=SparkRunner --spark_master_url=spark://host:7077 --environment_type=DOCKER
      --environment_options=docker_container_image=IMAGE

The local runner (no --runner, or --runner=DirectRunner) is Beam's FnApiRunner, chosen
here rather than by Beam's DirectRunner: in Beam 2.77 that one first tries the PrismRunner,
which downloads a binary from GitHub (offline: a logged failure, then the fallback; online:
the pipeline runs on Prism instead). `--runner=PrismRunner` still picks Prism.

On any other runner the Python work runs on the cluster's workers, which must be able to
import glam_tf: from an image that has it (`Dockerfile`), or from the package Beam stages
(`--setup_file`, added here from a source checkout when nothing else provides it).
`--environment_type=LOOPBACK` with such a runner is refused: it runs the Python work in
the submitting process, not on the cluster.

A flag that is neither the program's nor a Beam option is an error (a typo would otherwise
be dropped silently by Beam).
"""

from __future__ import annotations

import os

from absl import flags, logging

from glam_tf import files

# The embedded default: the local runner's multi-process mode on the local cores.
LOCAL_DEFAULTS = ("--runner=DirectRunner", "--direct_num_workers=2",
                  "--direct_running_mode=multi_processing")
REPO_ROOT = files.dirname(files.dirname(files.absolute(__file__)))
# Beam's --setup_file in a source checkout: Beam builds an sdist of it and stages it, and
# each worker pip-installs it (setup.py, not pyproject.toml: Beam 2.77 builds a
# pyproject.toml only with the `build` module; a setup.py also with `setup.py sdist`).
CHECKOUT_SETUP_FILE = files.join(REPO_ROOT, "setup.py")
# Runner names (lower case, without "runner") that run on this machine.
_LOCAL_NAMES = ("direct", "fnapi", "bundlebaseddirect", "switchingdirect", "prism",
                "testdirect")
# Those that get glam_tf's LocalRunner (Beam's FnApiRunner without the Prism attempt).
_LOCAL_RUNNER_NAMES = ("direct", "fnapi")
# Flags by which the workers of a remote runner get glam_tf (a staged package, an image or
# an environment the user set up).
_WORKER_PACKAGE_FLAGS = ("--setup_file", "--extra_package", "--extra_packages",
                         "--sdk_container_image", "--worker_harness_container_image",
                         "--environment_config", "--environment_options")


def parse_flags_keep_beam_args(argv):
    """An absl `flags_parser` for `app.run`: parses the program's flags, keeps the rest.

    Returns:
      `[argv[0], *unknown]`: the flags absl does not know (Beam's, checked later by
      `pipeline_options`).

    Raises:
      absl.flags.Error: a flag of the program does not parse.
    """
    return flags.FLAGS(argv, known_only=True)  # flags.Error: glam_tf.refusal.run, exit 2


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
    """Raises ValueError (one line) for flags of `beam_args` that are no Beam option, for
    `--environment_type=LOOPBACK` with a runner that is not local, and for a remote runner
    whose workers would have no glam_tf (cheap: for a program to fail before any heavy
    work)."""
    args = [str(a) for a in (beam_args or ())]
    unknown = unknown_beam_args(args)
    if unknown:
        raise ValueError(
            f"unknown flag(s) {unknown}: neither this program's flags nor Apache Beam pipeline "
            "options (see `python -m apache_beam.examples.wordcount --help` for Beam's, "
            "--helpfull for this program's)")
    runner = _flag_value(args, "--runner")
    if runner is None or _short_name(runner) in _LOCAL_NAMES:
        return
    environment = _flag_value(args, "--environment_type")
    if environment is not None and environment.upper() == "LOOPBACK":
        raise ValueError(
            f"--environment_type=LOOPBACK runs the Python work in this submitting process, not "
            f"on the workers of --runner={runner}: use --environment_type=DOCKER "
            "--environment_options=docker_container_image=IMAGE (an image built from this "
            "repository's Dockerfile) or --environment_type=EXTERNAL "
            "--environment_config=HOST:PORT (worker pools of that image)")
    _worker_package_args(args, runner)


def _worker_package_args(args, runner) -> list:
    """The flags to add so that the workers of `runner` (not local) can import glam_tf:
    none when a flag of _WORKER_PACKAGE_FLAGS provides it; `--setup_file` of this source
    checkout otherwise. Raises ValueError when neither is there (an installed package)."""
    if any(_flag_value(args, f) is not None for f in _WORKER_PACKAGE_FLAGS):
        return []
    if files.isfile(CHECKOUT_SETUP_FILE):
        return [f"--setup_file={CHECKOUT_SETUP_FILE}"]
    raise ValueError(
        f"the workers of --runner={runner} need glam_tf: pass --sdk_container_image=IMAGE "
        "(Dataflow) or --environment_type=DOCKER --environment_options="
        "docker_container_image=IMAGE (an image built from glam-tf's Dockerfile), or "
        "--extra_package=glam_tf-VERSION.tar.gz (an sdist of glam-tf) or --setup_file="
        "SOURCE/setup.py")


def pipeline_options(beam_args=None, paths=None):
    """`PipelineOptions` from extra argv, on top of the local runner's defaults.

    Args:
      beam_args: Beam flags (`["--runner=FlinkRunner", "--flink_master=..."]`), or None.
        Without `--runner`, the local defaults apply (a later `--direct_num_workers`
        overrides theirs). A runner that is not local and has no flag giving its workers
        glam_tf gets `--setup_file` of this checkout.
      paths: {flag name: path} the pipeline's workers read or write. A path on a file system
        that lives inside this process (`ram://`) makes the default runner run in memory
        (one worker: this process); with worker processes or a cluster runner asked for, it
        is refused.

    Raises:
      ValueError: as `check_args`, or a process-local path with a runner whose workers
        cannot see it.
    """
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

    args = [str(a) for a in (beam_args or ())]
    check_args(args)
    in_process = {flag: path for flag, path in (paths or {}).items()
                  if path and files.scheme(path) in PROCESS_LOCAL_SCHEMES}
    if in_process:
        args = _in_process_args(args, in_process)
    runner = _flag_value(args, "--runner")
    if runner is None:
        args = list(LOCAL_DEFAULTS) + args
    elif _short_name(runner) not in _LOCAL_NAMES:
        extra = _worker_package_args(args, runner)
        if extra:
            logging.info("workers of --runner=%s get glam_tf from %s (Beam stages an sdist of "
                         "this checkout; each worker pip-installs it with its pinned "
                         "requirements)", runner, extra[0])
        args += extra
    if _is_direct(args):
        if any(a == "--num_workers" or a.startswith("--num_workers=") for a in args):
            raise ValueError(
                "--num_workers is Beam's worker count on Dataflow; the DirectRunner's worker "
                "processes are set with --direct_num_workers=N")
        # The local worker processes unpickle our DoFns by module name: let them import
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


def local_runner(options):
    """The runner object for `beam.Pipeline(runner=..., options=options)`: a
    `glam_tf.beam_local.LocalRunner` for no --runner, --runner=DirectRunner or
    --runner=FnApiRunner; None otherwise (Beam builds the runner --runner names)."""
    from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top

    runner = options.view_as(StandardOptions).runner
    if runner is not None and _short_name(runner) not in _LOCAL_RUNNER_NAMES:
        return None
    from glam_tf import beam_local  # pylint: disable=g-import-not-at-top

    return beam_local.LocalRunner(options)


def is_direct(options) -> bool:
    """Whether `PipelineOptions` run on a DirectRunner-like local runner (the default without
    --runner: glam_tf's LocalRunner; or Beam's FnApiRunner or BundleBasedDirectRunner)."""
    from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top

    runner = options.view_as(StandardOptions).runner
    return runner is None or _short_name(runner) in _DIRECT


_DIRECT = ("direct", "fnapi", "bundlebaseddirect")


def _short_name(runner) -> str:
    """`--runner`'s value as Beam matches it: the class name of a dotted path, lower case,
    without the "runner" suffix ("DirectRunner", "direct" -> "direct")."""
    name = str(runner).rsplit(".", 1)[-1].lower()
    return name[:-len("runner")] if name.endswith("runner") and name != "runner" else name


def _flag_value(args, name):
    """The value of the last `name=value` or `name value` in `args`; None when absent."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def _is_direct(args) -> bool:
    return _short_name(_flag_value(args, "--runner") or "DirectRunner") in _DIRECT


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
