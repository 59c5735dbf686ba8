"""A pickle loader that builds only plain containers, numbers, strings and NumPy arrays.

The revisited test sets ship their ground truth as pickles, and a pickle can run any code
while it loads: this unpickler admits an allow-list of constructors and a memory budget
proportional to the file's size, so a crafted `gnd_*.pkl` is refused, naming the file and
what it asked for.
"""

import builtins
import codecs
import importlib
import io
import math
import pickle

import numpy as np

from glam_tf import files


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a ground-truth pickle asks to build an object outside the allow-list."""


_BUILTINS = frozenset(["set", "frozenset", "bytes", "bytearray", "complex", "list", "dict",
                       "tuple", "str", "int", "float", "bool"])
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
# Python 2 and protocol < 3 pickles store bytes as `_codecs.encode(text, "latin1")`.
_BYTE_ENCODINGS = frozenset(["latin1", "latin-1", "iso-8859-1", "iso8859-1", "ascii"])
# What a pickle may make its constructors allocate: an honest ground-truth pickle carries
# its data (array bytes, strings) in the file, so a few times its size suffices; a crafted
# one that sizes a buffer (`bytearray(10**10)`, `ndarray((10**9,), object)`) is refused.
_BUDGET_FACTOR = 4
_BUDGET_SLACK = 16 << 20


def _length(value, what):
    try:
        return len(value)
    except TypeError:
        raise TypeError(f"{what} of a {type(value).__name__}") from None


def _array_bytes(shape, dtype):
    """Bytes of a (shape, dtype) array; TypeError unless shape is a tuple of ints >= 0."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(
            isinstance(n, (int, np.integer)) and n >= 0 for n in shape):
        raise TypeError(f"array shape {shape!r} is not a tuple of non-negative integers")
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def _construction_cost(func, args):
    """Bytes `func(*args)` may allocate, computed from the arguments before the call.

    Raises TypeError for a call no ground-truth pickle makes (e.g. `str` of a nested list,
    whose text grows exponentially with shared references, or a direct `numpy.ndarray`).
    """
    first = args[0] if args else None
    if func in (bytes, bytearray):
        if isinstance(first, (int, np.integer)):
            return int(first)    # a buffer of that many zero bytes
        return 4 * _length(first, func.__name__) if args else 0
    if func is str:
        if args and not isinstance(first, (str, bytes, bytearray)):
            raise TypeError(f"str() of a {type(first).__name__}")
        return 4 * len(first) if args else 0
    if func in (list, tuple, set, frozenset, dict):
        return 8 * _length(first, func.__name__) if args else 0
    if func in (int, float, bool, complex, np.dtype):
        return 64
    if func is codecs.encode:
        encoding = args[1] if len(args) > 1 else "utf-8"
        if str(encoding).lower() not in _BYTE_ENCODINGS or not isinstance(first, (str, bytes)):
            raise TypeError(f"_codecs.encode with encoding {encoding!r}")
        return len(first)
    if func.__name__ == "_reconstruct":
        if args[0] is not np.ndarray:
            raise TypeError(f"_reconstruct of {args[0]!r}")
        return _array_bytes(args[1], args[2])
    if func.__name__ == "scalar":
        return np.dtype(first).itemsize + (_length(args[1], "scalar") if len(args) > 1 else 0)
    if func.__name__ == "_frombuffer":
        return _length(first, "_frombuffer")
    raise TypeError(f"a direct call of {getattr(func, '__name__', func)!r}")


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
    """Unpickler that builds only plain containers, numbers, strings and numpy arrays.

    Pickles of numpy arrays need, by protocol: 0-2 `numpy.core.multiarray._reconstruct`,
    `numpy.ndarray`, `numpy.dtype`, `_codecs.encode` (bytes under protocol < 3) and
    `builtins.set`; 3-4 the same without `_codecs`; 5 `numpy.core.numeric._frombuffer`;
    numpy scalars `numpy.core.multiarray.scalar`. numpy 2 spells `numpy.core` as
    `numpy._core`; both are accepted. Everything else is refused.

    It is the pure-Python unpickler, so that every call (REDUCE, NEWOBJ, INST/OBJ) and
    every array state (BUILD) is checked before it runs: each is charged the bytes it may
    allocate against a budget of 4x the file's size + 16 MiB, and an array state whose data
    does not match its shape is refused (numpy crashes the process on some of those).
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def __init__(self, file, *, source, size):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._size = size
        self._budget = _BUDGET_FACTOR * size + _BUDGET_SLACK
        self._spent = 0

    def _refuse(self, message):
        return UnsafePickleError(f"{self._source}: refused: {message}")

    def _charge(self, what, cost):
        self._spent += cost
        if self._spent > self._budget:
            raise self._refuse(
                f"{what} would bring the allocations of this {self._size}-byte pickle to "
                f"{self._spent} bytes, over its budget of {self._budget} bytes "
                f"({_BUDGET_FACTOR}x its size + {_BUDGET_SLACK >> 20} MiB); a ground-truth "
                "pickle carries its data, it does not size buffers. Re-download the file from "
                "its source.")

    def _call(self, func, args):
        name = getattr(func, "__name__", repr(func))
        try:
            cost = _construction_cost(func, tuple(args))
        except (TypeError, IndexError, ValueError, AttributeError) as e:
            raise self._refuse(f"the pickle calls {name} in a way no ground-truth pickle does "
                               f"({e})") from None
        self._charge(f"{name}()", cost)
        return func(*args)

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        if (module, name) in _NUMPY_ALLOWED:
            if module.startswith("numpy.core."):
                # numpy >= 2 moved numpy.core to numpy._core (the old name warns).
                module = "numpy._core." + module[len("numpy.core."):]
            return getattr(importlib.import_module(module), name)
        raise UnsafePickleError(
            f"{self._source}: refused to load global '{module}.{name}': ground-truth pickles "
            "may contain only lists, dicts, tuples, strings, numbers and numpy arrays "
            "(a pickle that builds other objects can run arbitrary code). Re-download the "
            "file from its source or rebuild it from plain data.")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise self._refuse(f"keyword arguments for {getattr(cls, '__name__', cls)!r}")
        self.append(self._call(cls, args))

    def _instantiate(self, klass, args):
        self.append(self._call(klass, args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray):
            self._charge("an array", self._array_state_bytes(state))
        elif not isinstance(inst, np.dtype):
            raise self._refuse(f"the pickle sets the state of a {type(inst).__name__}; only "
                               "numpy arrays and dtypes have one in a ground-truth pickle")
        inst.__setstate__(state)

    def _array_state_bytes(self, state):
        """Bytes of an ndarray state (version, shape, dtype, fortran, data) if it is whole."""
        try:
            shape, dtype, _, data = state[-4:]
            nbytes = _array_bytes(shape, dtype)
            count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
            if np.dtype(dtype).hasobject:
                whole = isinstance(data, list) and len(data) == count
            else:
                whole = (isinstance(data, (bytes, bytearray, str))
                         and len(data) == nbytes)
        except (TypeError, ValueError) as e:
            raise self._refuse(f"an array state that is not (shape, dtype, order, data): "
                               f"{e}") from None
        if not whole:
            raise self._refuse(f"an array state whose data does not fill its shape {shape} "
                               f"of {np.dtype(dtype)}")
        return nbytes

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def safe_load_pickle(path):
    """Loads a pickle admitting only plain containers, numbers, strings and numpy arrays.

    Raises:
        UnsafePickleError: the file asks for any other global (e.g. `os.system`), or would
            allocate more than 4x its size + 16 MiB; names the file and what was refused.
    """
    with files.open_file(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source=path, size=len(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise pickle.UnpicklingError(f"{path}: not a readable ground-truth pickle ({e})") from e
