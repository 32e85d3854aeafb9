"""Build and bind the C kernels in ``sparse_rows.c`` (compiled on first use, cached).

The kernels are plain C99 with OpenMP, compiled by the system C compiler (``$CC`` or
``gcc``/``cc``) into ``$LEANCONV_KERNEL_CACHE`` (default ``~/.cache/leanconv/kernels``),
once per scalar type, source version, compiler and CPU (the code is built with
``-march=native``). They are called through :mod:`ctypes` on raw data pointers; no torch
headers are involved, so a build takes about a second. Built with ``-fopenmp``, the library
binds to the OpenMP runtime that torch has already loaded, and each call takes its thread
count from ``torch.get_num_threads()``.

When no compiler works, or ``LEANCONV_NO_KERNELS=1`` is set, :func:`kernel_library` returns
``None`` and the layers use their pure-PyTorch paths; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

__all__ = ["KernelLibrary", "kernel_library", "kernels_available"]

log = logging.getLogger(__name__)

_SOURCE = "sparse_rows.c"
_FLAG_SETS = (  # tried in order; the last ones build single-threaded kernels (no OpenMP)
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-mcpu=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)
_TYPES = {torch.float32: "float", torch.float64: "double"}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_FORWARD_ARGS = [_P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
_WGRAD_ARGS = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I, ctypes.c_int]


class KernelLibrary:
    """One compiled copy of the kernels for one scalar type (``float`` or ``double``)."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.lc_lanes.restype = ctypes.c_int
        self.lanes: int = self._lib.lc_lanes()
        self.forward = self._lib.lc_forward
        self.forward.argtypes = _FORWARD_ARGS
        self.forward.restype = None
        self.weight_grad = self._lib.lc_weight_grad
        self.weight_grad.argtypes = _WGRAD_ARGS
        self.weight_grad.restype = ctypes.c_int


_LOADED: dict[torch.dtype, KernelLibrary | None] = {}


def _cache_dir() -> Path:
    env = os.environ.get("LEANCONV_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "leanconv" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, source: bytes, real: str, target: Path) -> bool:
    """Try each flag set until one builds ``target``; True on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        out = Path(tmp) / target.name
        for flags in _FLAG_SETS:
            cmd = [cc, *flags, "-std=gnu11", "-fPIC", "-shared", f"-DLC_REAL={real}", str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders race harmlessly
                return True
            log.debug("kernel build failed with %s: %s", flags, proc.stderr.strip()[-500:])
    return False


def _build(dtype: torch.dtype) -> KernelLibrary | None:
    if os.environ.get("LEANCONV_NO_KERNELS", "") not in ("", "0"):
        log.info("LEANCONV_NO_KERNELS is set; structured-sparse layers use pure PyTorch")
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found; structured-sparse layers fall back to pure PyTorch")
        return None
    try:
        source = resources.files(__package__).joinpath(_SOURCE).read_bytes()
    except (FileNotFoundError, OSError):
        log.warning("kernel source %s is missing from the installation; using pure PyTorch", _SOURCE)
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_signature().encode(),
                                     repr(_FLAG_SETS).encode(), _TYPES[dtype].encode()])).hexdigest()[:16]
    target = _cache_dir() / f"sparse_rows_{_TYPES[dtype]}_{key}.so"
    try:
        if not target.exists():
            if not _compile(cc, source, _TYPES[dtype], target):
                log.warning("could not compile %s with %s; using pure PyTorch", _SOURCE, cc)
                return None
            log.info("compiled %s (%s) into %s", _SOURCE, _TYPES[dtype], target)
        return KernelLibrary(target)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("kernel build or load failed (%s); using pure PyTorch", exc)
        return None


def kernel_library(dtype: torch.dtype) -> KernelLibrary | None:
    """The compiled kernels for ``dtype`` (float32 or float64), or ``None`` when unavailable."""
    if dtype not in _TYPES:
        return None
    if dtype not in _LOADED:
        _LOADED[dtype] = _build(dtype)
    return _LOADED[dtype]


def kernels_available() -> bool:
    """True when the float32 kernels compiled and loaded on this machine."""
    return kernel_library(torch.float32) is not None
