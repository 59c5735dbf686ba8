"""The local Beam runner of the pipelines: Beam's FnApiRunner, chosen explicitly.

Beam 2.77's DirectRunner (what `--runner=DirectRunner`, or no runner, gives) first tries
the PrismRunner, which downloads its binary from GitHub: offline every run logs
`Unable to fetch remote prism binary ... Falling back to DirectRunner`; online the
pipeline runs on Prism, whose workers and speed are not those documented here. For a
batch pipeline its fallback is the FnApiRunner; `LocalRunner` goes there directly, so a
local run is the same on every machine: no Prism attempt, no download.

With `--direct_running_mode=multi_processing` (the local default) the worker processes
run `python -m glam_tf.beam_worker` (Beam's SDK harness, each log line printed once)
instead of Beam's `sdk_worker_main` (every line twice). `glam_tf.beam_options.local_runner`
builds it.
"""

import sys

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.transforms import environments

WORKER_MODULE = "glam_tf.beam_worker"


def worker_environment():
    """The environment of the worker processes: `python -m glam_tf.beam_worker`, with this
    program's interpreter (its site-packages, its PYTHONPATH)."""
    return environments.SubprocessSDKEnvironment.from_command_string(
        f"{sys.executable} -m {WORKER_MODULE}")


class LocalRunner(fn_runner.FnApiRunner):
    """Beam's FnApiRunner with this package's worker processes.

    Reads `--direct_num_workers` and `--direct_running_mode` as the DirectRunner does:
    `in_memory` (one worker, this process), `multi_threading` (threads of this process),
    `multi_processing` (N processes running `glam_tf.beam_worker`). Hands the workers the
    pipeline options, as the DirectRunner does.
    """

    def __init__(self, options):
        processes = options.view_as(DirectOptions).direct_running_mode == "multi_processing"
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        super().__init__(
            default_environment=worker_environment() if processes else None,
            provision_info=fn_runner.ExtendedProvisionInfo(
                beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))

    def run_pipeline(self, pipeline, options):
        direct = options.view_as(DirectOptions)
        mode = direct.direct_running_mode
        if mode != "multi_processing":
            return super().run_pipeline(pipeline, options)
        # FnApiRunner maps multi_processing to Beam's own worker command; with the mode
        # cleared for this call it keeps the environment given to __init__.
        direct.direct_running_mode = None
        try:
            return super().run_pipeline(pipeline, options)
        finally:
            direct.direct_running_mode = mode
