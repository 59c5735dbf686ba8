"""Which Beam runner the pipelines get: the local one chosen explicitly (Beam's FnApiRunner,
never a Prism attempt), others as named; LOOPBACK refused with a remote runner; the local
worker processes' logs printed once (glam_tf.beam_worker)."""

import io
import logging
import os
import re
import subprocess
import sys

import apache_beam as beam
import pytest
from apache_beam.testing import util as beam_util
from apache_beam.runners.portability import prism_runner
from apache_beam.runners.portability.fn_api_runner import fn_runner

from glam_tf import beam_local, beam_options, beam_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args, local", [
    (None, True),
    (["--direct_num_workers=8"], True),
    (["--runner=DirectRunner"], True),
    (["--runner=direct"], True),
    (["--runner=FnApiRunner"], True),
    (["--runner=PrismRunner"], False),
    (["--runner=BundleBasedDirectRunner"], False),
    (["--runner=FlinkRunner", "--flink_master=h:8081", "--environment_type=DOCKER"], False),
])
def test_runner_choice(args, local):
    runner = beam_options.local_runner(beam_options.pipeline_options(args))
    if local:
        assert type(runner) is beam_local.LocalRunner  # pylint: disable=unidiomatic-typecheck
        assert isinstance(runner, fn_runner.FnApiRunner)
    else:
        assert runner is None   # Beam builds the runner --runner names


def test_default_runs_without_trying_prism(monkeypatch, caplog):
    """A local run never starts Prism (offline or not): Prism's entry points fail the test,
    and nothing Prism-related is logged."""
    def no_prism(*unused_args, **unused_kwargs):
        raise AssertionError("PrismRunner was tried")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    monkeypatch.setattr(prism_runner.PrismJobServer, "__init__", no_prism)
    options = beam_options.pipeline_options(["--direct_num_workers=1",
                                             "--direct_running_mode=in_memory"])
    caplog.set_level(logging.INFO)
    with beam.Pipeline(runner=beam_options.local_runner(options), options=options) as p:
        squares = p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * x)
        beam_util.assert_that(squares, beam_util.equal_to([1, 4, 9]))
    assert p.result.state == beam.runners.runner.PipelineState.DONE
    assert not [r for r in caplog.records if "prism" in r.getMessage().lower()]


def test_loopback_with_a_remote_runner_is_refused():
    for runner in ("FlinkRunner", "SparkRunner"):
        with pytest.raises(ValueError) as e:
            beam_options.check_args([f"--runner={runner}", "--environment_type=LOOPBACK"])
        message = str(e.value)
        assert message.startswith(
            "--environment_type=LOOPBACK runs the Python work in this submitting process, "
            f"not on the workers of --runner={runner}: use --environment_type=DOCKER "
            "--environment_options=docker_container_image=IMAGE")
        assert "\n" not in message
    # local runners keep Beam's meaning of LOOPBACK (nothing to refuse)
    beam_options.check_args(["--environment_type=LOOPBACK"])
    beam_options.check_args(["--runner=PrismRunner", "--environment_type=loopback"])


def test_worker_logging_has_one_handler_in_absl_format():
    """The worker's root logger: one stderr handler, absl's line format with the process
    id, whatever handlers were there before (the second copy of every line)."""
    root = logging.getLogger()
    saved = list(root.handlers)
    stream = io.StringIO()
    try:
        root.addHandler(logging.StreamHandler(io.StringIO()))   # e.g. basicConfig's
        handler = beam_worker.configure_logging(stream)
        assert root.handlers == [handler]
        logging.getLogger("apache_beam.x").warning("hello %d", 7)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    assert re.fullmatch(rf"W\d{{4}} \d\d:\d\d:\d\d\.\d{{3}} {os.getpid()} "
                        r"test_beam_runners\.py:\d+\] beam worker: hello 7\n", stream.getvalue())


def test_worker_processes_log_each_line_once(tmp_path):
    """Two local worker processes (the default mode): each worker's lines appear once
    (Beam's own worker prints them twice: its stderr, and relayed through the runner), no
    relayed copies, no Prism attempt, and a line logged by the pipeline's code once per
    element."""
    script = (
        "import logging, sys\n"
        "import apache_beam as beam\n"
        "from glam_tf import beam_options\n"
        "logging.basicConfig(level=logging.INFO)  # the runner's INFO lines (Prism's)\n"
        "options = beam_options.pipeline_options(None)\n"
        "with beam.Pipeline(runner=beam_options.local_runner(options), options=options) as p:\n"
        "    _ = (p | beam.Create(list(range(6))) | beam.Reshuffle()\n"
        "         | beam.Map(lambda x: logging.warning('element %d', x)))\n"
        "print('DONE')\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "DONE"
    err = result.stderr
    assert "prism" not in err.lower()
    assert "Worker: severity" not in err          # nothing relayed through the runner
    worker_lines = [line.split(" ", 2)[2] for line in err.splitlines()
                    if " beam worker: " in line]  # "<pid> <file:line>] beam worker: ..."
    starts = [line for line in worker_lines if line.endswith("Python sdk harness starting.")]
    assert len(starts) == 2 and len({s.split()[0] for s in starts}) == 2, starts
    assert len(worker_lines) == len(set(worker_lines)), sorted(
        line for line in worker_lines if worker_lines.count(line) > 1)
    elements = sorted(line.rsplit("element ", 1)[1] for line in worker_lines
                      if "beam worker: element " in line)
    assert elements == [str(i) for i in range(6)]
