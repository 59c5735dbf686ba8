"""The installable package: pins in step with requirements.txt, the commands and modules
pyproject.toml installs, the worker image's tags, and the package Beam stages for remote
workers built exactly as Beam 2.77's stager builds it, installed in a fresh virtual
environment, importable there and its command running."""

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tomllib

import pytest

from glam_tf import beam_options, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _pin(spec):
    """"tensorflow[and-cuda]==2.21.0" -> ("tensorflow", "2.21.0")."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z0-9,-]+\])?==([0-9][0-9A-Za-z.]*)", spec.strip())
    assert m, f"not an exact pin: {spec!r}"
    return m.group(1).lower(), m.group(3)


def _requirements():
    pins = {}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = _pin(line)
                pins[name] = version
    return pins


def test_pyproject_pins_are_requirements_pins():
    project = _pyproject()["project"]
    requirements = _requirements()
    runtime = dict(_pin(s) for s in project["dependencies"])
    extras = {k: dict(_pin(s) for s in v) for k, v in project["optional-dependencies"].items()}
    assert set(extras) == {"gpu", "gcp", "faiss", "test"}
    # the extras are the same packages at the same versions, with their own extras
    assert project["optional-dependencies"]["gpu"] == [
        f"tensorflow[and-cuda]=={requirements['tensorflow']}"]
    assert project["optional-dependencies"]["gcp"] == [
        f"apache-beam[gcp]=={requirements['apache-beam']}"]
    for pins in [runtime, *extras.values()]:
        for name, version in pins.items():
            assert requirements.get(name) == version, (name, version, requirements.get(name))
    named = set(runtime) | {n for pins in extras.values() for n in pins}
    assert set(requirements) <= named, f"in requirements.txt only: {set(requirements) - named}"


def test_commands_and_modules_are_the_programs(monkeypatch):
    config = _pyproject()
    programs = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith("_main.py"))
    assert sorted(config["tool"]["setuptools"]["py-modules"]) == programs
    assert sorted(cli.PROGRAMS.values()) == programs
    scripts = config["project"]["scripts"]
    assert sorted(scripts) == sorted(cli.PROGRAMS)
    for command, target in scripts.items():
        module, function = target.split(":")
        assert module == "glam_tf.cli"
        # each command's function runs its own program
        calls = []
        monkeypatch.setattr(cli, "run_program", calls.append)
        getattr(cli, function)()
        assert calls == [cli.PROGRAMS[command]], command


def test_worker_image_matches_the_pins():
    with open(os.path.join(REPO, "Dockerfile")) as f:
        base = re.search(r"^FROM (\S+)", f.read(), re.M).group(1)
    python = _pyproject()["project"]["requires-python"].lstrip(">=")
    assert base == f"apache/beam_python{python}_sdk:{_requirements()['apache-beam']}"


def _fresh_venv(path):
    """A virtual environment whose only extra path is this one's site-packages (for the
    pinned dependencies: TensorFlow, Beam, ...), without glam_tf."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120,
                   capture_output=True)
    python = os.path.join(path, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()
    with open(os.path.join(site, "glam_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_staged_package_builds_and_installs_in_a_fresh_venv(tmp_path):
    """The sdist Beam stages for `--setup_file` (beam_options adds this checkout's): built
    by Beam's own stager code, installed offline in a new venv, where glam_tf imports from
    the installed copy and a command runs."""
    from apache_beam.runners.portability import stager  # pylint: disable=import-outside-toplevel

    stage = tmp_path / "stage"
    stage.mkdir()
    sdist = stager.Stager._build_setup_package(  # pylint: disable=protected-access
        beam_options.CHECKOUT_SETUP_FILE, str(stage))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "setup.py", "train_main.py", "glam_tf/beam_worker.py",
            "glam_tf/data/synthetic/writer.py", "glam_tf/eval/rank_kernel.c"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)

    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", sdist], check=True, timeout=240, cwd=tmp_path,
                   env=env, capture_output=True)
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m, os, glam_tf, train_main; "
         "from glam_tf.eval import rank_kernel; "
         "print(glam_tf.__file__); print(sorted(m.requires('glam-tf'))); "
         "print(os.path.isfile(rank_kernel.SOURCE))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, requires, kernel_source = probe.stdout.splitlines()[:3]
    assert where.startswith(str(tmp_path / "venv")), where
    assert kernel_source == "True"  # the search's C source ships (package data)
    assert "'tensorflow==2.21.0'" in requires and "'apache-beam==2.77.0'" in requires
    command = os.path.join(tmp_path, "venv", "bin", "glam-build-gldv2")
    result = subprocess.run([command, "--helpfull"], capture_output=True, text=True,
                            timeout=180, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-2000:]   # absl exits 1 after its help
    assert "Converts Google Landmarks v2" in result.stdout   # the program's docstring
    assert "--gldv2_root" in result.stdout
    for command in cli.PROGRAMS:
        assert os.access(os.path.join(tmp_path, "venv", "bin", command), os.X_OK), command


@pytest.mark.parametrize("flag", ["--setup_file", "--sdk_container_image",
                                  "--environment_options"])
def test_remote_workers_get_the_package(flag):
    """A remote runner's options carry a way for its workers to import glam_tf: this
    checkout's setup.py unless the user gave one."""
    from apache_beam.options.pipeline_options import SetupOptions  # pylint: disable=import-outside-toplevel

    flink = ["--runner=FlinkRunner", "--flink_master=flink-host:8081",
             "--environment_type=DOCKER"]
    options = beam_options.pipeline_options(flink)
    assert options.view_as(SetupOptions).setup_file == beam_options.CHECKOUT_SETUP_FILE
    options = beam_options.pipeline_options(flink + [f"{flag}=x"])
    assert options.view_as(SetupOptions).setup_file == ("x" if flag == "--setup_file" else None)


def test_installed_package_without_image_or_staging_is_refused(monkeypatch):
    monkeypatch.setattr(beam_options, "CHECKOUT_SETUP_FILE", "/nonexistent/setup.py")
    with pytest.raises(ValueError) as e:
        beam_options.check_args(["--runner=DataflowRunner", "--project=p", "--region=r"])
    assert str(e.value).startswith("the workers of --runner=DataflowRunner need glam_tf: "
                                   "pass --sdk_container_image=IMAGE")
    assert "\n" not in str(e.value)
