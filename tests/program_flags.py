"""Prints, as JSON, the command-line flags each program of the repository defines.

    python tests/program_flags.py train_main.py bench/search.py ...

For tests/test_docs.py, which checks that the commands of the README and the guides pass
only flags their program defines. One process for all programs (TensorFlow is imported
once): each program is imported under a name other than `__main__`, so nothing runs.

- absl programs (`flags.DEFINE_*` at import, or in a `define_flags()` that their
  `__main__` block calls): the flags they add to `absl.flags.FLAGS`, which are removed
  again before the next program is imported (two programs may define the same name).
  absl's own flags (`--flagfile`, `--helpfull`, ...) count for every absl program.
- argparse programs (the parser built in `main()` or `parse_args()`): `main()` is called
  with `ArgumentParser.parse_args` replaced by a function that records the parser's
  option strings and stops the program before it does any work.

Output: {program: {"kind": "absl" | "argparse", "flags": [...], "booleans": [...],
"beam": bool}}; "beam" is true for programs that pass the flags they do not define to
Apache Beam (`glam_tf.beam_options.parse_flags_keep_beam_args`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class _ParserSeen(Exception):
    """Raised instead of parsing: carries the parser a program built."""

    def __init__(self, parser):
        super().__init__("parser recorded")
        self.parser = parser


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(
        "_program_" + path.stem, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as when run: its folder first on the path
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _argparse_flags(module) -> tuple:
    def record(self, *args, **kwargs):
        raise _ParserSeen(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = record
    argparse.ArgumentParser.parse_known_args = record
    saved_argv = sys.argv
    sys.argv = [module.__file__]
    try:
        module.main()
    except _ParserSeen as seen:
        options = seen.parser._option_string_actions  # pylint: disable=protected-access
        names = sorted(o[2:] for o in options if o.startswith("--"))
        booleans = sorted(o[2:] for o, a in options.items() if o.startswith("--")
                          and isinstance(a, (argparse._StoreTrueAction,  # pylint: disable=protected-access
                                             argparse._StoreFalseAction,  # pylint: disable=protected-access
                                             argparse.BooleanOptionalAction)))
        return names, booleans
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
        sys.argv = saved_argv
    raise RuntimeError(f"{module.__file__}: main() returned without building a parser")


def program_flags(paths) -> dict:
    """{path: {"kind", "flags", "booleans", "beam"}} for the program files `paths`."""
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from absl.flags import _helpers  # pylint: disable=import-outside-toplevel
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    fv = flags.FLAGS
    app.define_help_flags()  # --help, --helpfull, ... (app.run defines them)
    # absl's, app's and TensorFlow's own, and --flagfile / --undefok (absl's special
    # flags): every absl program accepts them.
    absl_own = set(fv) | set(_helpers.SPECIAL_FLAGS)  # pylint: disable=protected-access
    out = {}
    for name in paths:
        path = REPO_ROOT / name
        source = path.read_text()
        before = set(fv)
        module = _load(path)
        if set(fv) == before and callable(getattr(module, "define_flags", None)):
            module.define_flags()
        added = set(fv) - before
        if "argparse.ArgumentParser(" not in source:
            booleans = sorted(n for n in added if isinstance(fv[n], flags.BooleanFlag))
            out[name] = {"kind": "absl", "flags": sorted(added | absl_own),
                         "booleans": booleans,
                         "beam": "parse_flags_keep_beam_args" in source}
            for n in added:
                delattr(fv, n)
        else:
            names, booleans = _argparse_flags(module)
            out[name] = {"kind": "argparse", "flags": names, "booleans": booleans,
                         "beam": False}
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    json.dump(program_flags(sys.argv[1:]), sys.stdout)
