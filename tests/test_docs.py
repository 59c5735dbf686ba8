"""The README and the guides under docs/ say only what the code does (nothing drifts).

Every fenced shell block of README.md and docs/*.md is read command by command: the
program named exists, every `--flag` passed is one that program defines (absl or argparse,
found by tests/program_flags.py; for the Beam pipeline programs, flags they do not define
must be Apache Beam pipeline options), every flagfile and repository path named exists and
a flagfile's own flags belong to the program too. Every Python block compiles, every
relative link (and #anchor) between the pages resolves, and the two set-up commands of the
README are the ones .ci/run runs. The run folders the pages name are the flagfiles'
(`--train_dir`, the export folder training writes in it, or a bench's `--work_dir`), and
the Dockerfile's and flagfiles' pointers (`docs/x.md, "Section"`) name sections that exist.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md"] + sorted((REPO_ROOT / "docs").glob("*.md"))
SHELL_LANGS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
PYTHON = re.compile(r"(^|/)python[0-9.]*$")
SEPARATORS = {"&&", "||", "|", ";", "&"}
# A token naming a file of this repository (checked to exist).
REPO_PATH = re.compile(r"^(configs|bench|glam_tf|tests|docs|\.ci)/[\w./-]+$"
                       r"|^[\w]+_main\.py$|^requirements\.txt$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FRONT_PAGE_MAX_LINES = 200
UNPARSABLE = "<not shell>"


def page_name(page: pathlib.Path) -> str:
    return str(page.relative_to(REPO_ROOT))


def fenced_blocks(text: str):
    """(language, first line number, body) of each ``` block."""
    for m in FENCE.finditer(text):
        yield m.group(1).lower(), text.count("\n", 0, m.start()) + 2, m.group(2)


def shell_commands(body: str):
    """Simple commands of a shell block as token lists (continuations joined, comments,
    environment assignments and `[...]` optional brackets removed)."""
    joined = re.sub(r"\\\n", " ", body)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:  # an unclosed quote, or prose in an unclosed block
            yield [UNPARSABLE, f"{line!r}: {e}"]
            continue
        command = []
        for token in tokens + [";"]:
            if token in SEPARATORS:
                while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(token.strip("[]") if token.startswith("[--") else token)


def program_of(command):
    """(script, args) for `python <script> ...` and `<repo script>.sh ...`, else None."""
    if PYTHON.search(command[0]) and len(command) > 1 and command[1] != "-m":
        return command[1], command[2:]
    if command[0].endswith(".sh") and not command[0].startswith("/"):
        return command[0], command[1:]
    return None


def heading_slugs(text: str) -> set:
    """GitHub's anchors for the headings of a page (outside code blocks)."""
    slugs, seen = set(), {}
    without_code = FENCE.sub("", text)
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", without_code, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def _all_commands():
    """(page, line, command) for every simple command of every shell block."""
    for page in PAGES:
        for lang, line, body in fenced_blocks(page.read_text()):
            if lang in SHELL_LANGS:
                for command in shell_commands(body):
                    yield page_name(page), line, command


def _flagfile_flags(path: pathlib.Path, seen=None):
    """The `--flag` lines of a flagfile, nested flagfiles included (paths from the root)."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line.startswith("--"):
            continue
        if line.startswith("--flagfile="):
            nested = REPO_ROOT / line.split("=", 1)[1]
            out += _flagfile_flags(nested, seen) if nested.is_file() else [line]
        else:
            out.append(line)
    return out


@pytest.fixture(scope="module")
def programs():
    """tests/program_flags.py's output for every program the pages run and every *_main.py."""
    names = {p.name for p in REPO_ROOT.glob("*_main.py")}
    names |= {program_of(c)[0] for _, _, c in _all_commands()
              if program_of(c) and program_of(c)[0].endswith(".py")
              and (REPO_ROOT / program_of(c)[0]).is_file()}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "program_flags.py"),
                          *sorted(names)], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def undefined_flags(args, spec) -> list:
    """The `--flag` arguments of `args` that the program `spec` does not define (for a Beam
    program: that Beam does not define either)."""
    defined, booleans = set(spec["flags"]), set(spec["booleans"])
    rest = []
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in defined or (name.startswith("no") and name[2:] in booleans
                               and spec["kind"] == "absl"):
            continue
        rest.append(arg)
    if rest and spec["beam"]:
        from glam_tf import beam_options  # pylint: disable=import-outside-toplevel

        rest = beam_options.unknown_beam_args(rest)
    return rest


def check_command(command, programs) -> list:
    """Problems with one simple command (empty when it matches the code)."""
    if command[0] == UNPARSABLE:
        return [f"not a shell command: {command[1]}"]
    problems = []
    for token in command:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if REPO_PATH.match(value) and not (REPO_ROOT / value).exists():
            problems.append(f"{value} does not exist")
    found = program_of(command)
    if found is None:
        return problems
    script, args = found
    if not (REPO_ROOT / script).is_file():
        return problems + [f"program {script} does not exist"]
    if script.endswith(".sh"):
        source = (REPO_ROOT / script).read_text()
        return problems + [f"{script} has no option {a}" for a in args
                           if a.startswith("-") and a.split("=")[0] not in source]
    spec = programs[script]
    flags = list(args)
    if spec["kind"] == "absl":
        for arg in args:
            if arg.startswith("--flagfile="):
                path = REPO_ROOT / arg.split("=", 1)[1]
                if path.is_file():
                    flags += _flagfile_flags(path)
                elif not REPO_PATH.match(arg.split("=", 1)[1]):
                    problems.append(f"flagfile {path} does not exist")
    problems += [f"{script} does not define {a.split('=')[0]}"
                 for a in undefined_flags(flags, spec)]
    return problems


def test_every_shell_command_matches_the_code(programs):
    problems = [f"{page}, block at line {line}: `{' '.join(command)}`: {problem}"
                for page, line, command in _all_commands()
                for problem in check_command(command, programs)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flagfile", sorted((REPO_ROOT / "configs").glob("*.flags")),
                         ids=lambda p: p.name)
def test_every_flagfile_holds_only_its_programs_flags(flagfile, programs):
    program = "eval_main.py" if flagfile.name.startswith("eval_") else "train_main.py"
    bad = undefined_flags(_flagfile_flags(flagfile), programs[program])
    assert not bad, f"{flagfile.name}: {program} does not define {bad}"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_code_block_is_closed(page):
    fences = [n for n, line in enumerate(page.read_text().splitlines(), 1)
              if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{page_name(page)}: a ``` block is not closed ({fences})"


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_python_block_compiles(page):
    for lang, line, body in fenced_blocks(page.read_text()):
        if lang == "python":
            compile(body, f"{page_name(page)}, block at line {line}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_repository_path_in_the_prose_exists(page):
    """`configs/x.flags`, `glam_tf/eval/report.py`, ... in inline code outside the blocks."""
    missing = []
    for m in re.finditer(r"`([^`\n]+)`", FENCE.sub("", page.read_text())):
        for token in re.split(r"[\s,()]+", m.group(1)):
            token = token.split("=", 1)[-1].rstrip(".:;")
            if (REPO_PATH.match(token) and not re.search(r"[<>*{}]", token)
                    and not (REPO_ROOT / token).exists()):
                missing.append(token)
    assert not missing, f"{page_name(page)} names files that do not exist: {missing}"


def test_every_link_between_pages_resolves():
    problems = []
    for page in PAGES:
        text = page.read_text()
        for m in LINK.finditer(FENCE.sub("", text)):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page_name(page)}: link {target}: {path} does not exist")
            elif anchor and anchor not in heading_slugs(dest.read_text()):
                problems.append(f"{page_name(page)}: link {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_setup_commands_are_the_ones_ci_runs():
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3.11 -m venv")]
    assert len(ci) == 1, ".ci/run should run one venv + install + pytest line"
    readme_lines = [line for lang, _, body in fenced_blocks((REPO_ROOT / "README.md").read_text())
                    if lang in SHELL_LANGS for line in body.splitlines()]
    assert ci[0] in readme_lines, f"the README does not give .ci/run's command {ci[0]!r}"
    demo = [line for line in readme_lines if "--flagfile=configs/demo.flags" in line
            and line.startswith("python3.11 -m venv")]
    assert len(demo) == 1, "the README should give one set-up + demo command"
    ci_steps, demo_steps = ci[0].split(" && "), demo[0].split(" && ")
    assert demo_steps[0] == ci_steps[0]
    assert demo_steps[1].replace(" -q", "") == ci_steps[1].replace(" -q", "")
    assert demo_steps[2] == ".venv/bin/python train_main.py --flagfile=configs/demo.flags"


def test_front_page_is_short_and_lists_every_guide():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= FRONT_PAGE_MAX_LINES
    guides = {page_name(p) for p in PAGES[1:]}
    linked = {m.group(1).partition("#")[0] for m in LINK.finditer(text)}
    assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"


def test_the_checks_catch_drift(programs):
    """The checker itself: a wrong flag, program, flagfile or link is reported."""
    assert check_command(["python", "train_main.py", "--train_steps=3"], programs) == []
    assert check_command(["python", "train_main.py", "--notrain_stepz"], programs) == [
        "train_main.py does not define --notrain_stepz"]
    assert check_command(["python", "eval_main.py", "--runner=FlinkRunner",
                          "--flink_master=h:8081", "--no_such_beam_flag=1"], programs) == [
        "eval_main.py does not define --no_such_beam_flag"]
    assert check_command(["python", "export_main.py", "--runner=FlinkRunner"], programs) == [
        "export_main.py does not define --runner"]
    assert check_command(["python", "nope_main.py"], programs) == [
        "nope_main.py does not exist", "program nope_main.py does not exist"]
    assert check_command(["python", "train_main.py", "--flagfile=configs/nope.flags"],
                         programs) == ["configs/nope.flags does not exist"]
    assert list(shell_commands("A=1 python x.py --a \\\n  --b  # c\necho 'd && e' | f")) == [
        ["python", "x.py", "--a", "--b"], ["echo", "d && e"], ["f"]]
    assert heading_slugs("# The demo (`configs/demo.flags`)\n```sh\n# not a heading\n```\n") \
        == {"the-demo-configsdemoflags"}


# Flags that decide which features an evaluation extracts: two commands writing the same
# features folder must agree on them, or the second is refused.
FEATURE_FLAGS = ("model", "train_dir", "scales", "max_image_size", "inference_gem_p",
                 "regional_gem", "scale_aggregation")


def _flag_values(args) -> dict:
    """{name: value} of the `--flag` arguments, a flagfile's first (later ones override)."""
    values = {}
    for arg in args:
        if arg.startswith("--flagfile=") and (REPO_ROOT / arg.split("=", 1)[1]).is_file():
            values.update(_flag_values(_flagfile_flags(REPO_ROOT / arg.split("=", 1)[1])))
        elif arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            values[name] = value or "true"
    return values


def feature_folders(commands) -> dict:
    """{(output_dir, features of): {feature flag values: [command, ...]}} of eval_main runs."""
    out = {}
    for command in commands:
        found = program_of(command)
        if not found or found[0] != "eval_main.py":
            continue
        values = _flag_values(found[1])
        folders = [values.get("dataset")] + (["revisitop1m"] if values.get("distractors") else [])
        key = tuple((name, values.get(name)) for name in FEATURE_FLAGS)
        for folder in folders:
            out.setdefault((values.get("output_dir"), folder), {}).setdefault(key, []).append(
                " ".join(command))
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_evaluations_a_page_gives_do_not_collide(page):
    """Commands given in sequence write other models' features to other folders."""
    commands = [c for lang, _, body in fenced_blocks(page.read_text())
                if lang in SHELL_LANGS for c in shell_commands(body)]
    clashes = {folder: runs for folder, runs in feature_folders(commands).items()
               if len(runs) > 1}
    assert not clashes, f"{page_name(page)}: evaluations sharing a features folder: {clashes}"


def _demo_config(*overrides):
    from absl import flags  # pylint: disable=import-outside-toplevel

    from glam_tf.config import TrainConfig, settings  # pylint: disable=import-outside-toplevel

    fv = flags.FlagValues()
    settings.define_flags(TrainConfig, fv)
    fv(["train_main", f"--flagfile={REPO_ROOT / 'configs' / 'demo.flags'}", *overrides])
    return settings.from_flags(TrainConfig, fv)


def test_the_demo_ends_with_its_outputs_and_commands_that_work(programs):
    from glam_tf.train.what_next import what_next  # pylint: disable=import-outside-toplevel

    config = _demo_config()
    step_dir = "runs/demo/eval/step_320"
    text = what_next(config, export_dir="runs/demo/export/1", outputs={
        "json": f"{step_dir}/results-synth.json", "png": f"{step_dir}/vis-synth/top10.png",
        "html": f"{step_dir}/vis-synth/top10.html",
        "attention_png": f"{step_dir}/vis-synth/attention.png"})
    assert text.splitlines()[:5] == [
        "Outputs:",
        f"  picture  {step_dir}/vis-synth/top10.png  (each query and its top 10; legend "
        "under the picture)",
        f"  picture  {step_dir}/vis-synth/attention.png  (local and global spatial attention "
        "over the query and its top 5)",
        "  export   runs/demo/export/1  (SavedModel; TF Serving base path runs/demo/export)",
        f"  results  {step_dir}/results-synth.json"]
    commands = [line.strip() for line in text.splitlines() if line.startswith("  python ")]
    assert commands == [
        "python eval_main.py --dataset=synth --data_root=data/synth_demo --max_image_size=192 "
        "--model=runs/demo/export --output_dir=runs/demo/eval_export",
        "python eval_main.py --dataset=synth --data_root=data/synth_demo --max_image_size=192 "
        "--train_dir=runs/demo --scales=1 --visualize=0,5,40 --visualize_attention "
        "--output_dir=runs/demo/eval_attention",
        "python export_main.py --train_dir=runs/demo --export_dir=runs/demo/export_384 "
        "--max_image_size=384 --scales=1"]
    # every command passes only flags its program defines, and the two evaluations write
    # their own folders, not the run's own evaluation's (<train_dir>/eval/step_<n>)
    tokens = [shlex.split(c) for c in commands]
    assert [p for c in tokens for p in check_command(c, programs)] == []
    folders = feature_folders(tokens)
    assert len(folders) == 2 and all(len(runs) == 1 for runs in folders.values())
    assert not any(out.startswith("runs/demo/eval/") for out, _ in folders)


def test_what_next_offers_only_what_the_run_has():
    from glam_tf.train.what_next import what_next  # pylint: disable=import-outside-toplevel

    baseline = what_next(_demo_config("--variant=baseline"), export_dir="runs/demo/export/1",
                         outputs={"json": "runs/demo/eval/step_320/results-synth.json"})
    assert "--visualize_attention" not in baseline and "picture" not in baseline
    assert "export_main.py" in baseline and "--model=runs/demo/export" in baseline
    no_export = what_next(_demo_config("--noexport", "--eval_dataset="), export_dir=None,
                          outputs=None)
    assert no_export == ""


# ---- the guides' run folders are the flagfiles' ---------------------------------------

RUN_FOLDER = re.compile(r"(?<![\w.-])runs/[\w.-]+")
# `--model` / `--export_dir` of a run: the folder training exports to (`<train_dir>/export`,
# glam_tf.config.contract.export_dir) or a sibling `export_<what>` beside it.
EXPORT_FOLDER = re.compile(r"^(?P<train_dir>runs/[\w.-]+)/export(_[\w.-]+)?/?$")


def flagfile_train_dirs() -> set:
    """The `--train_dir` of every flagfile under configs/."""
    return {line.split("=", 1)[1] for path in (REPO_ROOT / "configs").glob("*.flags")
            for line in _flagfile_flags(path) if line.startswith("--train_dir=")}


def unknown_run_folders(text: str, train_dirs: set) -> list:
    """`runs/<name>` folders a page names that are neither a flagfile's `--train_dir` nor
    a bench's `--work_dir` given on the same page."""
    work_dirs = set(re.findall(r"--work_dir=(runs/[\w.-]+)", text))
    return sorted({m.group(0) for m in RUN_FOLDER.finditer(text)}
                  - train_dirs - work_dirs)


def run_paths_off_the_flagfiles(command, train_dirs: set) -> list:
    """The `--train_dir`, `--model` and `--export_dir` values of a `*_main.py` command that
    are not a flagfile's run folder or the export folder training writes in it."""
    found = program_of(command)
    if not found or not found[0].endswith("_main.py"):
        return []
    problems = []
    for arg in found[1]:
        name, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or not value or re.search(r"[<$]", value) \
                or value.startswith("/") or "://" in value:
            continue
        if name == "train_dir" and value.rstrip("/") not in train_dirs:
            problems.append(f"--train_dir={value} is no flagfile's --train_dir")
        elif name in ("model", "export_dir"):
            m = EXPORT_FOLDER.match(value)
            if not m or m.group("train_dir") not in train_dirs:
                problems.append(f"--{name}={value} is not <a flagfile's train_dir>/export")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_the_guides_run_folders_are_the_flagfiles(page):
    """A guide's paths are those a flagfile's run writes: `runs/glam_r101_gldv2clean` and
    its `export/` folder, not a name of the guide's own."""
    train_dirs = flagfile_train_dirs()
    text = page.read_text()
    problems = [f"names {folder}" for folder in unknown_run_folders(text, train_dirs)]
    problems += [f"block at line {line}: `{' '.join(c)}`: {p}"
                 for lang, line, body in fenced_blocks(text) if lang in SHELL_LANGS
                 for c in shell_commands(body)
                 for p in run_paths_off_the_flagfiles(c, train_dirs)]
    assert not problems, f"{page_name(page)}: " + "\n".join(problems)


# ---- pointers from comments to a guide's section ---------------------------------------

SECTION_POINTER = re.compile(r"(docs/[\w-]+\.md|README(?:\.md)?)[,:]? \"([^\"]+)\"")


def missing_sections(comment_text: str) -> list:
    """`docs/x.md, "Section"` pointers whose page has no heading starting with Section."""
    missing = []
    for page, section in SECTION_POINTER.findall(comment_text):
        page = "README.md" if page == "README" else page
        path = REPO_ROOT / page
        headings = re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", path.read_text()), re.M) \
            if path.is_file() else []
        if not any(h.startswith(section) for h in headings):
            missing.append(f'{page}, "{section}"')
    return missing


def _comments(path: pathlib.Path) -> str:
    """A file's `#` comment lines joined into one text (a pointer may wrap)."""
    return " ".join(line.lstrip()[1:].strip() for line in path.read_text().splitlines()
                    if line.lstrip().startswith("#"))


@pytest.mark.parametrize("path", [REPO_ROOT / "Dockerfile"]
                         + sorted((REPO_ROOT / "configs").glob("*.flags")),
                         ids=lambda p: p.name)
def test_pointers_to_sections_name_sections_that_exist(path):
    assert not missing_sections(_comments(path)), \
        f"{path.name} points at sections that do not exist: {missing_sections(_comments(path))}"


def test_the_dockerfile_points_at_the_runners_guide():
    assert SECTION_POINTER.search(_comments(REPO_ROOT / "Dockerfile"))


def test_the_path_and_pointer_checks_catch_drift():
    train_dirs = flagfile_train_dirs()
    assert "runs/glam_r101_gldv2clean" in train_dirs and "runs/demo" in train_dirs
    assert unknown_run_folders("`runs/glam_r101` and runs/demo/export", train_dirs) == [
        "runs/glam_r101"]
    assert unknown_run_folders("--work_dir=runs/ablation; runs/ablation/x", train_dirs) == []
    command = ["python", "eval_main.py", "--model=exports/glam",
               "--train_dir=runs/glam_r101", "--output_dir=runs/demo/eval"]
    assert run_paths_off_the_flagfiles(command, train_dirs) == [
        "--model=exports/glam is not <a flagfile's train_dir>/export",
        "--train_dir=runs/glam_r101 is no flagfile's --train_dir"]
    assert run_paths_off_the_flagfiles(
        ["python", "export_main.py", "--train_dir=runs/glam_r101_gldv2clean",
         "--export_dir=runs/glam_r101_gldv2clean/export"], train_dirs) == []
    assert missing_sections('(README, "GLDv2 on a cluster") (docs/scale-out.md, "Runners")'
                            ' (docs/nope.md: "Runners")') == [
        'README.md, "GLDv2 on a cluster"', 'docs/nope.md, "Runners"']
