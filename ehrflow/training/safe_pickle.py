"""Load GAMENet/SafeDrug research pickles without running the code they may carry.

Those artefacts are written with ``dill``, which stores classes defined in ``__main__`` (the
``Voc`` vocabulary) *by value*, including code objects, and a pickle can name any importable
callable. This unpickler resolves only an allow-list of globals; each one maps to a plain
container, numpy array reconstruction, or a local stand-in that never executes anything from
the file. Anything else fails with an error naming the file and the refused global.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ehrflow.records.errors import RecordError


class UnsafePickleError(RecordError):
    """A pickle that names a global outside the allow-list, or that is malformed."""


class Voc:
    """Plain stand-in for GAMENet's ``Voc``: only the two mappings, no behaviour."""

    def __init__(self) -> None:
        self.idx2word: dict[int, str] = {}
        self.word2idx: dict[str, int] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"Voc state must be a dict, got {type(state).__name__}")
        idx2word = state.get("idx2word", {})
        word2idx = state.get("word2idx", {})
        if not isinstance(idx2word, dict) or not isinstance(word2idx, dict):
            raise pickle.UnpicklingError("Voc idx2word/word2idx must be dicts")
        self.idx2word = idx2word
        self.word2idx = word2idx


class _Inert:
    """What dill's function/code/type-loading globals become: a value that cannot be called."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<inert {self.what}>"

    def __setstate__(self, _state: object) -> None:
        """State a dill function or code object carries is dropped, never applied."""


def _inert_factory(what: str):
    def make(*_args: object, **_kwargs: object) -> _Inert:
        return _Inert(what)

    return make


def _dill_create_type(_metaclass: object, name: object, _bases: object, _namespace: object) -> type:
    """dill rebuilds ``__main__`` classes from their source; only ``Voc`` is accepted, as the local class."""
    if name != "Voc":
        raise pickle.UnpicklingError(f"class {name!r} stored by value (only 'Voc' is allowed)")
    return Voc


def _inert_setattr(target: object, _name: object, _value: object) -> None:
    """dill sets attributes (e.g. ``__qualname__``) on rebuilt classes/functions: ignored, never applied."""
    if target is not Voc and not isinstance(target, _Inert):
        raise pickle.UnpicklingError(f"setattr on {type(target).__name__} is not allowed")


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)  # type: ignore[call-overload]


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> np.generic:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalar with object dtype is not allowed")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
    if not isinstance(spec, str) or spec.startswith("O"):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not allowed")
    return np.dtype(spec, align=align, copy=copy)


def _dill_create_array(f: object, args: tuple, state: tuple, npdict: object = None) -> np.ndarray:
    """dill's wrapper around numpy's own ``_reconstruct``; only that reconstruction is performed."""
    if f is not _reconstruct:
        raise pickle.UnpicklingError("dill array creation with a non-numpy constructor")
    array = _reconstruct(*args)
    array.__setstate__(state)
    if npdict:
        raise pickle.UnpicklingError("numpy array with instance attributes is not allowed")
    return array


def _copyreg_reconstructor(cls: object, base: object, state: object) -> object:
    if cls is not Voc or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg reconstruction is only allowed for Voc")
    return Voc.__new__(Voc)


_ALLOWED: dict[tuple[str, str], object] = {
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "object"): object,
    ("builtins", "setattr"): _inert_setattr,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "object"): object,
    ("__builtin__", "__main__"): _Inert("__main__ namespace"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("copy_reg", "_reconstructor"): _copyreg_reconstructor,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dill._dill", "_create_array"): _dill_create_array,
    ("dill._dill", "_create_type"): _dill_create_type,
    ("dill._dill", "_load_type"): _inert_factory("type"),
    ("dill._dill", "_create_function"): _inert_factory("function"),
    ("dill._dill", "_create_code"): _inert_factory("code"),
    ("dill._dill", "_create_cell"): _inert_factory("cell"),
    ("dill._dill", "_get_attr"): _inert_factory("attribute"),
    ("dill._dill", "_setattr"): _inert_setattr,
}
# ``ndarray`` is only accepted as the ``subtype`` argument of ``_reconstruct``; ``np.dtype`` is
# wrapped so that object dtypes are refused.


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name == "Voc":  # GAMENet's class, pickled by reference from whatever module defined it
            return Voc
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self.source,
                None,
                f"{module}.{name}",
                f"refused global {module}.{name}: only plain containers, numpy arrays and Voc are allowed",
            ) from None

    def persistent_load(self, pid: object) -> Any:
        raise UnsafePickleError(self.source, None, "persistent_id", "persistent references are not allowed")


def safe_load(path: str | Path) -> Any:
    """Unpickle ``path`` through the allow-list; malformed or code-carrying files raise ``UnsafePickleError``."""
    path = Path(path)
    with path.open("rb") as fh:
        try:
            return _AllowListUnpickler(fh, str(path)).load()  # type: ignore[arg-type]
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise UnsafePickleError(path, None, None, f"malformed or disallowed pickle: {exc}") from exc


__all__ = ["UnsafePickleError", "Voc", "safe_load"]
