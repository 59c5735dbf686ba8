"""The local runner's worker process: Beam's Python SDK harness, each log line printed once.

`python -m glam_tf.beam_worker` is the command of the worker processes that
`glam_tf.beam_options.LocalRunner` starts for `--direct_running_mode=multi_processing`
(the local default). Beam's own worker (`apache_beam.runners.worker.sdk_worker_main`)
prints every log record twice on a local run: once through a stderr handler (Python's
default one, installed by the first import-time warning of Beam's GCP modules) and once
sent to the runner, which logs it again as `Worker: severity: ... message: "..."`. A
worker started here shares the program's stderr, so it keeps one path: its own stderr,
in absl's line format with the worker's process id, and nothing sent to the runner.
Failures still reach the program: the harness reports a failed bundle (with its
traceback) to the runner, which raises it.
"""

import logging
import os
import sys

# Set by the runner for the harness's log relay; without it the harness sends no logs.
RELAY_ENV = "LOGGING_API_SERVICE_DESCRIPTOR"
LINE_FORMAT = ("%(levelname).1s%(asctime)s.%(msecs)03d %(process)d %(filename)s:%(lineno)d] "
               "beam worker: %(message)s")


def configure_logging(stream=None) -> logging.Handler:
    """Makes one stderr handler (absl's line format) the root logger's only handler.

    Done before Beam is imported, so that Beam's import-time warnings find a handler and
    Python installs no second, default one.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT, datefmt="%m%d %H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return handler


def main(argv=None) -> None:
    configure_logging()
    os.environ.pop(RELAY_ENV, None)
    from apache_beam.runners.worker import sdk_worker_main  # pylint: disable=g-import-not-at-top

    sdk_worker_main.main(argv if argv is not None else sys.argv)


if __name__ == "__main__":
    main()
