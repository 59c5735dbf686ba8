"""Every setting has one owner: each config field defines its flag (name, default, help), and
the flags parse back into the config; the programs define exactly those flags."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from glam_tf.config import (DataConfig, EvalConfig, ExportConfig, ModelConfig, SettingError,
                            SyntheticConfig, TrainConfig, settings)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = (ModelConfig, DataConfig, SyntheticConfig, ExportConfig, EvalConfig, TrainConfig)


def _other_value(f, default):
    """A value of the setting's kind that differs from its default (and passes parsing)."""
    kind, rule = f.metadata["kind"], f.metadata["rule"]
    if isinstance(rule, settings.Choice):
        return next(c for c in rule.choices if c != default)
    return {
        "bool": lambda: not default,
        "int": lambda: (default or 0) + 3,
        "float": lambda: (default or 0.0) + 0.25,
        "string": lambda: "some/where",
        "floats": lambda: (0.5, 2.0),
        "ints": lambda: (4, 5, 6),
        "strings": lambda: ("a", "b"),
        "sizes": lambda: ((64, 32), (32, 64)),
    }[kind]()


def _command_line(name, f, value):
    kind = f.metadata["kind"]
    if kind == "bool":
        return f"--{name}" if value else f"--no{name}"
    if kind in ("floats", "ints", "strings"):
        return f"--{name}={','.join(map(str, value))}"
    if kind == "sizes":
        return f"--{name}={','.join(f'{w}x{h}' for w, h in value)}"
    return f"--{name}={value}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_owns_its_flag_and_parses_back(cls):
    walked = settings.flag_fields(cls)
    names = [name for name, _, _ in walked]
    assert len(names) == len(set(names)), names          # one flag per setting
    for f in dataclasses.fields(cls):                      # every field is a setting
        assert "help" in f.metadata and f.metadata["help"], (cls.__name__, f.name)
    fv = flags.FlagValues()
    settings.define_flags(cls, fv)
    fv(["program"])
    for name, f, default in walked:
        assert fv[name].help.endswith(f.metadata["help"])   # enums prefix their choices
        assert fv[name].default == (
            [settings._PARSE[f.metadata["kind"]][1](v) for v in default]
            if f.metadata["kind"] in settings._PARSE and default is not None else default)
    assert settings.from_flags(cls, fv) == cls()           # the defaults are the config's
    # Every flag set to another value: the config carries exactly those values.
    wanted = {name: _other_value(f, default) for name, f, default in walked}
    fv = flags.FlagValues()
    settings.define_flags(cls, fv)
    fv(["program"] + [_command_line(name, f, wanted[name]) for name, f, _ in walked])
    assert settings.as_flags(settings.from_flags(cls, fv)) == wanted


def test_nested_settings_carry_their_prefix_in_flags_and_errors():
    names = {name for name, _, _ in settings.flag_fields(TrainConfig)}
    assert {"train_file_pattern", "deterministic_data", "synthetic_image_size",
            "export_scales", "export_max_image_bytes", "eval_root", "eval_scales",
            "backbone"} <= names
    assert "seed" in names and "data_seed" not in names    # the run's seed seeds the data
    bad = TrainConfig(train_dir="x", data_source="synthetic",
                      synthetic=SyntheticConfig(root="r", image_size=16))
    with pytest.raises(SettingError, match=r"^--synthetic_image_size must be an integer "
                                           r">= 32; received --synthetic_image_size=16"):
        bad.validate()
    with pytest.raises(SettingError, match=r"^--scales must be a non-empty list"):
        ExportConfig(scales=()).validate()


def test_bad_list_flag_names_the_flag():
    fv = flags.FlagValues()
    settings.define_flags(ExportConfig, fv)
    fv(["program", "--scales=1,abc"])
    with pytest.raises(SettingError, match=r"--scales must be a comma-separated list like "
                                           r"0.70710678,1,1.41421356; received --scales=1,abc"):
        settings.from_flags(ExportConfig, fv)


_PROGRAM_FLAGS = r"""
import json, sys
from absl import flags
name = sys.argv[1]
module = __import__(name)
if hasattr(module, "define_flags"):
    module.define_flags()
by_module = flags.FLAGS.flags_by_module_dict()
print("FLAGS " + json.dumps(sorted(f.name for m, fs in by_module.items()
                                   if m.startswith(("glam_tf", name)) for f in fs)))
"""


@pytest.mark.parametrize("program,cls,own", [
    ("train_main", TrainConfig, {"logical_cpus"}),
    ("eval_main", EvalConfig, set()),
    ("export_main", ExportConfig, {"train_dir", "export_dir", "version"}),
    ("make_synthetic_main", SyntheticConfig, {"num_workers", "force"}),
])
def test_programs_define_exactly_their_configs_flags(program, cls, own):
    proc = subprocess.run([sys.executable, "-c", _PROGRAM_FLAGS, program], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    defined = set(json.loads(proc.stdout.split("FLAGS ", 1)[1]))
    assert defined == {name for name, _, _ in settings.flag_fields(cls)} | own
