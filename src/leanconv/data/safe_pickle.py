"""Load pickles that may only contain plain containers and numpy arrays.

The CIFAR "python version" batches are pickles, and ``pickle.load`` on an untrusted file runs
arbitrary code: ``find_class`` can import any callable (``os.system``) and ``REDUCE`` calls it.
:class:`ArrayUnpickler` overrides ``find_class`` so that only the few callables that rebuild a
numpy array are reachable, each wrapped to accept only harmless arguments:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` and
  ``numpy.ndarray`` - create an empty array, filled later by ``ndarray.__setstate__``;
* ``numpy.dtype`` - refused for object dtypes (which could smuggle arbitrary objects);
* ``numpy._core.numeric._frombuffer`` - the protocol-5 array path;
* ``_codecs.encode`` with ``latin1`` - how protocol 2 spells ``bytes`` under Python 3;
* ``bytes()`` with no argument (``__builtin__.bytes`` / ``builtins.bytes``) - how protocol 2
  spells *empty* bytes, e.g. the buffer of an array with zero rows.

Everything else raises :class:`LeanconvError` before anything is called.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from leanconv.errors import LeanconvError

__all__ = ["ArrayUnpickler", "load_array_pickle"]

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer


class _Refused(Exception):
    """Raised inside the unpickler; turned into a LeanconvError naming the file."""


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused("an object dtype")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _Refused(f"an array subclass {subtype!r}")
    return _reconstruct(np.ndarray, shape, _safe_dtype(dtype))


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _Refused("a non-bytes array buffer")
    return _frombuffer(buf, _safe_dtype(dtype), shape, order)


def _safe_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "utf8"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _safe_empty_bytes(*args: Any) -> bytes:
    if args:  # bytes(n) would allocate n bytes
        raise _Refused("bytes() with arguments")
    return b""


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_encode,
    ("__builtin__", "bytes"): _safe_empty_bytes,
    ("builtins", "bytes"): _safe_empty_bytes,
}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy-array callables in ``_ALLOWED``."""

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        """Return the wrapped callable for ``module.name`` or refuse it."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids never occur in data pickles: refuse them."""
        raise _Refused("a persistent id")


def load_array_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` (``encoding='bytes'``, as Python 2 pickles need) with
    :class:`ArrayUnpickler`; anything unsafe or malformed raises :class:`LeanconvError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return ArrayUnpickler(handle, encoding="bytes").load()
    except _Refused as exc:
        raise LeanconvError(f"{path} refused: the pickle asks for {exc}, which a data file never "
                            "needs; do not load files from untrusted sources") from None
    except FileNotFoundError:
        raise LeanconvError(f"{path} does not exist; check the data directory") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a data file is a user error
        raise LeanconvError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); "
                            "download it again") from None
