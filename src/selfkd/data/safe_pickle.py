"""Read pickled dataset files as data only: a restricted unpickler.

CIFAR's official "python version" files are pickles (Python 2 ``cPickle`` dicts of bytes keys,
lists of ints or bytes and numpy ``uint8`` arrays). A plain :func:`pickle.load` would run any
callable a file names (a ``__reduce__`` payload), so a dataset folder from an untrusted source
could execute code. :func:`load_data_pickle` resolves only the globals such files contain:

* numpy array reconstruction (``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``,
  ``numpy.dtype``, ``numpy[._]core.multiarray.scalar``, and protocol-5
  ``numpy[._]core.numeric._frombuffer``);
* ``_codecs.encode(text, "latin1")``, which Python 3 writes for ``bytes`` at protocols < 3.

Built-in values (dict, list, tuple, str, bytes, int, float, bool, None) need no global.
Anything else is an :class:`UnsafePickleError` naming the global; nothing it names is imported
or called.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "load_data_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allowlist (it may carry code)."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what Python 3 writes for ``bytes`` (latin-1)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(
            f"pickle asks _codecs.encode for encoding {encoding!r}; only latin1 is allowed"
        )
    return text.encode("latin1", errors)


def _numpy_attr(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy 2) or ``numpy.core.<module>.<name>`` (numpy 1)."""
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module), name)


#: (module, name) -> the object it resolves to; both numpy 1 and numpy 2 module names
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _core in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _numpy_attr(
        "multiarray", "_reconstruct"
    )
    ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
    ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"it asks for {module}.{name}, which is not data (allowed: dicts, lists, "
                "bytes, numbers and numpy arrays)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("it uses persistent ids, which data files never contain")


def load_data_pickle(source: str | os.PathLike | bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle a data file (path or bytes) allowing only plain values and numpy arrays.

    ``encoding`` is passed to the unpickler (``"bytes"`` keeps Python 2 ``str`` as bytes, as
    CIFAR's keys are). Raises :class:`UnsafePickleError` for any other global (nothing is run),
    other :class:`pickle.UnpicklingError`/``EOFError``/... for a corrupt file.
    """
    if isinstance(source, bytes):
        return _DataUnpickler(io.BytesIO(source), encoding=encoding).load()
    with open(source, "rb") as handle:
        return _DataUnpickler(handle, encoding=encoding).load()
