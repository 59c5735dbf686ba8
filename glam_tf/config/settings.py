"""Settings that own themselves: a dataclass field holds a setting's default, help and rule.

Every config of glam_tf (ModelConfig, DataConfig, SyntheticConfig, ExportConfig,
EvalConfig, TrainConfig) declares each setting once, with `setting(...)`; nested configs
with `nested(...)`. From those fields:
- `check(config, names)` applies each field's rule and raises SettingError naming the flag
  (a config's `validate(names)` calls it, then checks the rules between fields);
- `define_flags(cls)` defines one absl flag per field (name, default, help, choices);
- `from_flags(cls, flag_values)` builds the config the parsed flags describe;
- `flag_fields(cls)` lists every (flag name, field, default), for tests and docs.
No TensorFlow: the `*_main.py` programs check their flags before any heavy import.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional

from glam_tf import files
from glam_tf.refusal import BadInput, Refused


class SettingError(BadInput, ValueError):
    """A setting breaks its rule; the message names the flag, the rule, the value and a fix."""


def fail(flag: str, rule: str, value, fix: str = ""):
    """Raises SettingError in the one message format of every config."""
    raise SettingError(f"--{flag} {rule}; received --{flag}={_show(value)}. {fix}".rstrip())


def reachable(flag: str, path) -> None:
    """Refuses (glam_tf.refusal.Refused: one line naming `--flag` and `path`, exit status 3)
    a path on a file system TensorFlow has no support for or cannot reach, or that only
    looks like a URL (glam_tf.files.check_reachable); nothing for an empty or a plain
    local path."""
    if path:
        try:
            files.check_reachable(path, flag)
        except files.UnreachablePathError as e:
            raise Refused(e.path, f"--{e.flag}: {e.problem}", e.advice) from None


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on a setting's value and the words that say what it demands."""

    text: str
    ok: Callable

    def __call__(self, value) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Rule:
    """An integer in [low, high] (either end open when None)."""
    if low == 1 and high is None:
        words = "a positive integer"
    elif high is None:
        words = "an integer" + (f" >= {low}" if low is not None else "")
    else:
        words = f"an integer in [{low}, {high}]"
    return Rule(f"must be {words}", lambda v: is_int(v) and (low is None or v >= low)
                and (high is None or v <= high))


def number(low: Optional[float] = None, high: Optional[float] = None, *,
           low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite real number in the interval given (ends open when asked)."""
    if low is not None and high is not None:
        words = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                 f"{')' if high_open else ']'}")
    elif low is not None:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        words = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        words = "a finite number"

    def ok(v):
        return (is_real(v) and math.isfinite(v)
                and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Rule(f"must be {words}", ok)


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of values (an enum flag)."""

    choices: tuple = ()


def one_of(choices) -> Choice:
    choices = tuple(choices)
    return Choice(f"must be one of {', '.join(map(str, choices))}",
                  lambda v: v in choices, choices)


def numbers_list(low: float = 0.0, *, ints: bool = False) -> Rule:
    """A non-empty list of numbers > low (integers >= 1 when ints)."""
    if ints:
        return Rule("must be a non-empty list of positive integers",
                    lambda v: isinstance(v, (tuple, list)) and v
                    and all(is_int(x) and x >= 1 for x in v))
    return Rule(f"must be a non-empty list of finite numbers > {low:g}",
                lambda v: isinstance(v, (tuple, list)) and v
                and all(is_real(x) and math.isfinite(x) and x > low for x in v))


NONEMPTY = Rule("must not be empty", lambda v: bool(v))
BOOL = Rule("must be a bool", lambda v: isinstance(v, bool))

# How a list-valued setting is written on the command line and read back.
_PARSE = {
    "floats": (float, str),
    "ints": (int, str),
    "strings": (str, str),
    "sizes": (lambda s: tuple(int(v) for v in s.lower().split("x")),
              lambda wh: f"{wh[0]}x{wh[1]}"),
}
_LIST_EXAMPLES = {"floats": "0.70710678,1,1.41421356", "ints": "1,2,3", "strings": "a,b",
                  "sizes": "512x352,448x448"}


def setting(default, help: str, *, rule: Optional[Rule] = None, fix: str = "",  # noqa: A002
            kind: Optional[str] = None, flag: Optional[str] = None):
    """A dataclass field that owns a setting: its default, help text and rule.

    Args:
        default: the default value (tuples for lists; None allowed with `kind`).
        help: the flag's help text (one line or two).
        rule: what the value must satisfy (checked by `check`); choices come from
            `one_of` rules and become an enum flag.
        fix: a hint appended to the error message.
        kind: "bool", "int", "float", "string", or a list kind "floats", "ints",
            "strings", "sizes" (WIDTHxHEIGHT pairs); inferred from the default otherwise.
        flag: the flag's name when it is not the field's (prefix + name); "" for a field
            that has no flag.
    """
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "string"}.get(type(default))
        if kind is None:
            raise TypeError(f"setting(default={default!r}) needs kind=")
    if kind == "bool" and rule is None:
        rule = BOOL
    return dataclasses.field(default=default, metadata={
        "help": help, "rule": rule, "fix": fix, "kind": kind, "flag": flag})


def nested(cls, help: str, *, prefix: str = "", rename=None, only=None,  # noqa: A002
           default=None):
    """A field holding another config; its settings become flags `prefix + field name`.

    Args:
        cls: the nested config class.
        help: what the nested config is for (docs only).
        prefix: prepended to the nested fields' flag names.
        rename: {field name: flag name without prefix} where the nested name reads badly.
        only: the nested fields that get flags here (the others keep their defaults).
        default: the nested config's default instance (default: `cls()`); its values are
            the flags' defaults.
    """
    factory = (lambda: default) if default is not None else cls
    return dataclasses.field(default_factory=factory, metadata={
        "help": help, "nested": cls, "prefix": prefix, "rename": dict(rename or {}),
        "only": None if only is None else tuple(only)})


def _flag_name(f, prefix, rename):
    return f.metadata.get("flag") or prefix + rename.get(f.name, f.name)


def _walk(cls, prefix="", rename=None, only=None, defaults=None):
    """Yields (flag name, field, default value) of every flagged setting of cls."""
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        if "nested" in meta:
            inner = (getattr(defaults, f.name) if defaults is not None
                     else f.default_factory())
            yield from _walk(meta["nested"], prefix + meta["prefix"], meta["rename"],
                             meta["only"], inner)
        elif "help" in meta and meta["flag"] != "":
            default = getattr(defaults, f.name) if defaults is not None else f.default
            yield _flag_name(f, prefix, rename), f, default


def flag_fields(cls) -> list:
    """[(flag name, dataclasses.Field, default)] of every flag `define_flags(cls)` makes."""
    return list(_walk(cls))


def to_json(config) -> dict:
    """`config` as a JSON-able dict (nested configs as dicts, tuples as lists)."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def as_flags(config) -> dict:
    """{flag name: value} of every flagged setting of `config` (nested ones included)."""
    return {name: value for name, _, value in _walk(type(config), defaults=config)}


def names_of(cls, prefix: str = "", rename=None) -> dict:
    """{field name: flag name} of cls's own settings, for error messages."""
    rename = rename or {}
    return {f.name: _flag_name(f, prefix, rename) for f in dataclasses.fields(cls)
            if "nested" not in f.metadata}


def nested_names(cls, field_name: str) -> dict:
    """{field name: flag name} of the config nested in `cls.<field_name>`."""
    meta = next(f for f in dataclasses.fields(cls) if f.name == field_name).metadata
    return names_of(meta["nested"], meta["prefix"], meta["rename"])


def check(config, names=None) -> None:
    """Applies the rule of each of `config`'s own settings; SettingError names the flag.

    Nested configs are checked by their own `validate` (which knows when they apply).
    """
    names = names or names_of(type(config))
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        if "nested" in f.metadata or rule is None:
            continue
        value = getattr(config, f.name)
        if not rule(value):
            fail(names.get(f.name, f.name), rule.text, value, f.metadata["fix"])


def define_flags(cls, flag_values=None) -> None:
    """Defines one absl flag per setting of `cls` (and of its nested configs).

    Args:
        cls: a config class made of `setting` / `nested` fields.
        flag_values: absl FlagValues (default: the global FLAGS).
    """
    from absl import flags  # noqa: PLC0415 (absl only where flags are made)

    fv = flag_values if flag_values is not None else flags.FLAGS
    for name, f, default in _walk(cls):
        meta = f.metadata
        kind, help_text, rule = meta["kind"], meta["help"], meta["rule"]
        if kind == "bool":
            flags.DEFINE_bool(name, default, help_text, flag_values=fv)
        elif kind == "int":
            flags.DEFINE_integer(name, default, help_text, flag_values=fv)
        elif kind == "float":
            flags.DEFINE_float(name, default, help_text, flag_values=fv)
        elif kind == "string" and isinstance(rule, Choice) and default in rule.choices:
            flags.DEFINE_enum(name, default, list(rule.choices), help_text, flag_values=fv)
        elif kind == "string":
            flags.DEFINE_string(name, default, help_text, flag_values=fv)
        elif kind in _PARSE:
            shown = None if default is None else [_PARSE[kind][1](v) for v in default]
            flags.DEFINE_list(name, shown, help_text, flag_values=fv)
        else:
            raise TypeError(f"setting {name}: unknown kind {kind!r}")


def _parse(name: str, kind: str, value, default):
    if kind not in _PARSE or value is None:
        return value
    if not value:   # an empty list flag: the empty list, or "unset" where that is the default
        return None if default is None else ()
    parse = _PARSE[kind][0]
    try:
        return tuple(parse(v) for v in value)
    except ValueError:
        raise SettingError(f"--{name} must be a comma-separated list like "
                           f"{_LIST_EXAMPLES[kind]}; received --{name}={','.join(value)}."
                           ) from None


def from_flags(cls, flag_values=None, *, prefix: str = "", rename=None, only=None,
               defaults=None):
    """The `cls` instance the parsed flags describe (fields without a flag: `defaults`).

    Raises:
        SettingError: a list flag does not parse (rules are checked by `validate`).
    """
    from absl import flags  # noqa: PLC0415

    fv = flag_values if flag_values is not None else flags.FLAGS
    rename = rename or {}
    defaults = defaults if defaults is not None else cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if only is not None and f.name not in only:
            continue
        if "nested" in meta:
            kwargs[f.name] = from_flags(meta["nested"], fv, prefix=prefix + meta["prefix"],
                                        rename=meta["rename"], only=meta["only"],
                                        defaults=getattr(defaults, f.name))
        elif "help" in meta and meta["flag"] != "":
            name = _flag_name(f, prefix, rename)
            if name in fv:
                kwargs[f.name] = _parse(name, meta["kind"], fv[name].value,
                                        getattr(defaults, f.name))
    return dataclasses.replace(defaults, **kwargs)


def exit_with_usage_error(program: str, error) -> None:
    """Prints `<program>: error: <error>` (one line) and where the flags are listed; exits
    with 2 (glam_tf.refusal.usage_error).

    A bad setting is one line, not the ~200 lines of flag help absl's UsageError prints.
    """
    from glam_tf.refusal import usage_error  # noqa: PLC0415

    usage_error(program, " ".join(str(error).split()))
