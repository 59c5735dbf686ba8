"""BUILD stays in step with the tree: every file it names exists, every .py is named."""

import pathlib
import shutil
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ("py_library", "py_binary", "py_test")


def _load_build():
    """Evaluates BUILD with recording stand-ins for the rules; returns {rule: [kwargs]}."""
    targets = {rule: [] for rule in RULES}

    def recorder(rule):
        def record(**kwargs):
            targets[rule].append(kwargs)

        return record

    namespace = {rule: recorder(rule) for rule in RULES}
    namespace["glob"] = lambda *a, **k: pytest.fail("BUILD must list files, not glob()")
    exec(compile((REPO_ROOT / "BUILD").read_text(), "BUILD", "exec"), namespace)
    return targets


def _named_files(targets):
    files = set()
    for kwargs_list in targets.values():
        for kwargs in kwargs_list:
            files.update(kwargs.get("srcs", []))
            files.update(kwargs.get("data", []))
    return files


def test_every_named_file_exists():
    missing = sorted(f for f in _named_files(_load_build()) if not (REPO_ROOT / f).exists())
    assert not missing, f"BUILD names files that do not exist: {missing}"


def test_every_python_file_is_named():
    named = _named_files(_load_build())
    python_files = {
        str(path.relative_to(REPO_ROOT))
        for folder in ("glam_tf", "tests", "bench")
        for path in (REPO_ROOT / folder).rglob("*.py")
    }
    python_files |= {p.name for p in REPO_ROOT.glob("*_main.py")}
    unnamed = sorted(python_files - named)
    assert not unnamed, f"Python files missing from BUILD: {unnamed}"


def test_one_binary_per_main_and_bench_script_and_one_test_per_test_file():
    targets = _load_build()
    binaries = {src for t in targets["py_binary"] for src in t["srcs"]}
    assert binaries == {p.name for p in REPO_ROOT.glob("*_main.py")} | {
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "bench").glob("*.py")
    }
    tests = {src for t in targets["py_test"] for src in t["srcs"]}
    assert tests == {
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*.py")
    }


def test_dependencies_resolve_to_targets():
    targets = _load_build()
    names = {t["name"] for kwargs_list in targets.values() for t in kwargs_list}
    for kwargs_list in targets.values():
        for t in kwargs_list:
            for dep in t.get("deps", []):
                assert dep.startswith(":") and dep[1:] in names, f"{t['name']}: unknown dep {dep}"


@pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel not installed")
def test_bazel_query_loads():
    result = subprocess.run(
        ["bazel", "--batch", "query", "//..."], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "//:glam_tf_model" in result.stdout
