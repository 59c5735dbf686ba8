"""SIGTERM stops training promptly at any point: real processes, real signals.

The stop logic (glam_tf.train.checkpointing.StopSignal) in a small driver: during set-up it
exits at once; while stepping it lets the running step end and checkpoint; a step stuck
inside a TensorFlow op (here an input pipeline from which nothing ever comes, the shape of
a shard set where nothing decodes) cannot run a Python handler, and still exits after the
grace period.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

_DRIVER = textwrap.dedent("""
    import sys, time
    import tensorflow as tf
    from glam_tf.train.checkpointing import StopSignal

    phase = sys.argv[1]
    never = iter(tf.data.Dataset.range(1).repeat().filter(lambda x: x < 0))
    with StopSignal(grace_s=3.0) as stop:
        if phase != "setup":
            stop.start_stepping()
        print("ready", flush=True)
        if phase == "steps":
            while not stop.requested:          # quick steps: the loop sees the flag
                time.sleep(0.01)
            stop.finishing()
            time.sleep(1.0)                    # "saving the checkpoint": no forced exit
            print("checkpointed", flush=True)
        else:
            next(never)                        # blocks inside a TF op, forever
    print("returned", flush=True)
""")


@pytest.mark.parametrize("phase, status, message", [
    ("setup", 128 + signal.SIGTERM, "Received SIGTERM during set-up: no step has run"),
    ("stuck", 128 + signal.SIGTERM, "the running step did not end within 3 s"),
    ("steps", 0, "will checkpoint and stop after this step"),
])
def test_sigterm_stops_promptly(tmp_path, phase, status, message):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(driver), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err[-3000:]
    assert message in err, err[-3000:]
    if phase == "steps":
        assert out.split() == ["checkpointed", "returned"]
    else:
        assert "returned" not in out
    # set-up: at once; stuck: the 3-s grace; a generous bound for a loaded machine
    assert waited < {"setup": 10, "stuck": 15, "steps": 15}[phase]
