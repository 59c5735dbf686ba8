"""One line per refusal: how every `*_main.py` reports a user path it cannot use.

A program refuses (exit status EXIT_REFUSED, one line on stderr naming the path and what
to do) when the file system or a file it was pointed at stops it: a directory that cannot
be written, a file where a directory belongs, a pattern that matches a directory, a full
disk, a damaged SavedModel. That is not a crash (status 1, a traceback: a bug to report)
nor a bad flag value (EXIT_USAGE, settings.exit_with_usage_error). The traceback is
printed as well only with --verbosity=1.

    with refusal.refusals("train_main", verbose=FLAGS.verbosity >= 1):
        ...

Library code raises `Refused(path, problem, advice)` where it knows better than the errno
what went wrong; OSError and tf.errors.OpError from the file system are described here.
No TensorFlow import: a TensorFlow error can only occur once a program has imported it.

`run(main, program)` replaces absl's `app.run` in every program and is the one place the
exit-status contract is kept: a flag that does not parse (absl's errors, a missing or
unreadable --flagfile), a `BadInput` (a setting, a weights file, training records) or an
error the input pipeline raised (tf.data) is one line and EXIT_USAGE; a refusal is one line
and EXIT_REFUSED; anything else is a crash (status 1, the traceback).
"""

from __future__ import annotations

import contextlib
import errno
import re
import sys
import traceback
from typing import Optional

EXIT_USAGE = 2
EXIT_REFUSED = 3

_FREE_SPACE = ("free space there or choose another directory, then rerun the same command "
               "(nothing incomplete was left under a final name)")
# errno -> (what is wrong, what to do)
_ERRNO = {
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE),
    errno.EROFS: ("read-only file system", "choose a writable directory"),
    errno.EACCES: ("permission denied", "make it writable (and readable) for this user or "
                                        "choose another path"),
    errno.EPERM: ("operation not permitted", "make it writable for this user or choose "
                                             "another path"),
    errno.EISDIR: ("is a directory where a file was expected", "give the path of a file"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory",
                    "give a directory path (or move the file away)"),
    errno.ENOENT: ("does not exist", "check the path"),
    errno.EIO: ("input/output error", "check the device (and its free space), then rerun "
                                      "the same command"),
}
# An input/output error on a URL (glam_tf.files relays a store's TensorFlow errors as EIO).
_STORE_EIO = ("the storage service failed the request", "check the network route to it "
              "and the credentials, then rerun the same command")
# tf.errors class name -> advice, for the file-system errors TensorFlow's C++ raises
# (their message names the path; POSIX errno ENOSPC/EDQUOT become RESOURCE_EXHAUSTED).
_TF_ADVICE = {
    "ResourceExhaustedError": _FREE_SPACE,
    "PermissionDeniedError": "make it writable (and readable) for this user or choose "
                             "another path",
    "NotFoundError": "check the path",
    "FailedPreconditionError": "check that the path is a file or folder as expected",
    "DataLossError": "the file is damaged: restore or regenerate it",
    "AlreadyExistsError": "choose another path or remove the existing one",
}


class BadInput(Exception):
    """Input a program cannot use (a setting, a weights file, training records): its
    message is the one line naming the flag, file or record and what to do; EXIT_USAGE."""


# The prefix of every error the training input pipeline raises from inside tf.data
# (glam_tf.data.pipeline): a record's label out of range, a run of undecodable records.
PIPELINE_PREFIX = "glam_tf input pipeline:"


class Refused(Exception):
    """A user path a program cannot use: `path`, what is wrong, what to do."""

    def __init__(self, path, problem: str, advice: str):
        self.path, self.problem, self.advice = str(path), problem, advice
        super().__init__(f"{path}: {problem}; {advice}")


def _tf_error(error) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(error, tf.errors.OpError)


# How Apache Beam relays a worker's OSError: "OSError: [Errno 28] No space left on device:
# '<path>' [while running 'Describe']" in a RuntimeError (the original is not chained when
# the worker is another process).
_RELAYED = re.compile(r"^(?:\w+Error): \[Errno (\d+)\] [^\n]*?: '([^'\n]+)'")


def describe(error: BaseException) -> Optional[str]:
    """The refusal line for `error` (without the program name), or None: not a refusal.

    Follows the exception's chain (`raise ... from`, or raised while handling), so a
    refusal wrapped by a pipeline runner is still recognised; stops at a BadInput (what
    caused bad input is not a refused path).
    """
    seen = set()
    while error is not None and id(error) not in seen and not isinstance(error, BadInput):
        seen.add(id(error))
        line = _describe_one(error)
        if line is not None:
            return line
        error = error.__cause__ or error.__context__
    return None


def _describe_one(error: BaseException) -> Optional[str]:
    if isinstance(error, RuntimeError):
        match = _RELAYED.match(str(error))
        if match and int(match.group(1)) in _ERRNO:
            problem, advice = _ERRNO[int(match.group(1))]
            return f"{match.group(2)}: {problem}; {advice}"
    if isinstance(error, Refused):
        return str(error)
    if isinstance(error, OSError) and error.errno in _ERRNO:
        code = error.errno
        if code == errno.EIO and "no space left on device" in str(error.strerror).lower():
            code = errno.ENOSPC  # glam_tf.files relays TensorFlow's RESOURCE_EXHAUSTED so
        problem, advice = _ERRNO[code]
        path = error.filename if error.filename is not None else "(path not given)"
        if code == errno.EIO and "://" in str(path):  # an object store, not a device
            problem, advice = _STORE_EIO
        return f"{path}: {problem}; {advice}"
    if _tf_error(error) and type(error).__name__ in _TF_ADVICE:
        message = " ".join(str(error.message).split())
        return f"{message}; {_TF_ADVICE[type(error).__name__]}"
    return None


def refuse(program: str, error: BaseException, *, verbose: bool = False) -> None:
    """Prints `<program>: refused: <line>` (and the traceback when verbose); exits."""
    line = describe(error) or f"{type(error).__name__}: {error}"
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    hint = "" if verbose else " (--verbosity=1 shows the traceback)"
    print(f"{program}: refused: {line}{hint}", file=sys.stderr, flush=True)
    sys.exit(EXIT_REFUSED)


@contextlib.contextmanager
def refusals(program: str, *, verbose: bool = False):
    """Turns the refusals raised in the block into `refuse`; other errors pass (crashes)."""
    try:
        yield
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a refusal)
        if describe(e) is None:
            raise
        refuse(program, e, verbose=verbose)


def bad_input(error: BaseException) -> Optional[str]:
    """The one line for `error` when it is bad input (exit EXIT_USAGE), else None: a
    BadInput, or a TensorFlow error raised inside tf.data by the input pipeline's checks
    (its message from PIPELINE_PREFIX, without TensorFlow's node and graph context)."""
    if isinstance(error, BadInput):
        return " ".join(str(error).split())
    if _tf_error(error):
        message = str(error.message)
        start = message.find(PIPELINE_PREFIX)
        if start >= 0:
            text = message[start + len(PIPELINE_PREFIX):]
            text = re.split(r"\s*\[\[|\n\n", text, maxsplit=1)[0]
            # tf.debugging.Assert prints its data as "[a] [b] ...": the sentence again.
            text = " ".join(text.replace("] [", " ").split()).strip("[] ")
            return "training records: " + text
    return None


def usage_error(program: str, line: str, *, flag_help: bool = True) -> None:
    """Prints `<program>: error: <line>` (with `flag_help`, where the flags are listed on
    the next line); exits 2."""
    print(f"{program}: error: {line}", file=sys.stderr, flush=True)
    if flag_help:
        print(f"Run `python {program}.py --helpfull` for every flag and its help.",
              file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def run(main, program: str, *, flags_parser=None) -> None:
    """absl's `app.run(main)` under the exit-status contract (module docstring).

    Args:
        main: the program's absl main(argv).
        program: its name for messages ("train_main").
        flags_parser: absl `flags_parser` (default: parse the program's flags).
    """
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    parse = flags_parser or (lambda argv: flags.FLAGS(argv))

    def parse_or_exit(argv):
        try:
            return parse(argv)
        except flags.Error as e:
            usage_error(program, " ".join(str(e).split()))

    def guarded(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            usage_error(program, " ".join(str(e).split()))
        except Exception as e:  # pylint: disable=broad-except  (re-raised unless one line)
            verbose = flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
            line = bad_input(e)
            if line is not None:
                if verbose:
                    traceback.print_exception(e, file=sys.stderr)
                usage_error(program, line, flag_help=False)
            if describe(e) is None:
                raise
            refuse(program, e, verbose=verbose)

    app.run(guarded, flags_parser=parse_or_exit)
