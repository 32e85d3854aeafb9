"""Read and write IDX files, the format of MNIST and Fashion-MNIST (optionally gzipped).

An IDX file is a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then ``NDIM`` big-endian uint32
dimension sizes, then the values in C order, big-endian. ``TYPE`` is one of the codes in
``_TYPES``. Files whose name ends in ``.gz`` are decompressed on the fly. Every structural
problem (bad magic, wrong size, truncated gzip stream) raises :class:`LeanconvError` naming
the file, so a half-downloaded dataset is reported rather than silently mis-parsed.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from leanconv.errors import LeanconvError

__all__ = ["read_idx", "write_idx"]

# IDX type code -> big-endian numpy dtype.
_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.str[1:]: code for code, dtype in _TYPES.items()}  # "u1", "i2", "f4", ...


def _read_bytes(path: Path) -> bytes:
    """The file's (decompressed) content; corrupt or truncated gzip becomes a LeanconvError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise LeanconvError(f"IDX file {path} does not exist; check the data directory") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise LeanconvError(f"IDX file {path} is corrupt or truncated ({exc}); "
                            "download it again") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Parse the IDX file at ``path`` into a native-endian numpy array of its stored shape."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise LeanconvError(f"{path} is not an IDX file (bad magic number); download it again")
    code, ndim = raw[2], raw[3]
    if code not in _TYPES:
        raise LeanconvError(f"{path} has unknown IDX type code 0x{code:02x}; download it again")
    if ndim == 0:
        raise LeanconvError(f"{path} declares 0 dimensions; download it again")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LeanconvError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise LeanconvError(
            f"{path} holds {len(raw)} bytes but its header {list(dims)} implies {expected}; "
            "the file is truncated or corrupt, download it again")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    key = array.dtype.str[1:]
    if key not in _CODES:
        raise LeanconvError(f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, "
                            "float32 or float64")
    if not 1 <= array.ndim <= 255:
        raise LeanconvError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    code = _CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + body)
