"""The runtimes a compressed model is deployed on, and one way to run a model in each.

A speedup only means something on the runtime the model will run on, so every latency that
leanconv's latency budgets use names one (``--runtime``):

* ``torch``: PyTorch eager on the CPU in its deployment form: BatchNorm folded into the
  convs (:mod:`leanconv.deploy.fold`), channels_last memory layout, ``torch.inference_mode``,
  and (on glibc) a C allocator that keeps freed memory (:func:`steady_allocator`).
* ``onnxruntime``: the model exported to ONNX (:mod:`leanconv.deploy.onnx`), run by ONNX
  Runtime's CPU provider with every graph optimisation on.
* ``openvino``: the same ONNX file compiled by OpenVINO for its CPU plugin, latency hint.
  An optional extra (``pip install 'leanconv[openvino]'``, installed by ``scripts/setup.sh``).

:func:`prepare` turns a model into a :class:`Prepared` call that runs one random batch;
``threads`` is the runtime's intra-op thread count, ``batch`` the batch size. Nothing here
times anything: :mod:`leanconv.cost.side_by_side` and :mod:`leanconv.cost.latency_table` do.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib.metadata
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanconv.cost.layer_graph import layer_onnx
from leanconv.errors import LeanconvError
from leanconv.util.files import is_os_failure, os_error
from leanconv.util.limits import MAX_BATCH, MAX_THREADS
from leanconv.util.model_io import check_shape
from leanconv.util.modes import eval_mode

__all__ = ["RUNTIMES", "DEFAULT_RUNTIME", "Prepared", "prepare", "check_runtime", "check_threads_batch",
           "runtime_version", "steady_allocator", "torch_threads"]

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
DEFAULT_RUNTIME = "onnxruntime"
_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}
_INSTALL = {"openvino": "pip install 'leanconv[openvino]' (or: pip install openvino)",
            "onnxruntime": "pip install onnxruntime", "torch": "pip install torch"}


def check_runtime(name: str) -> str:
    """``name`` if it is a runtime leanconv can use here; else one line saying what to do."""
    if name not in RUNTIMES:
        raise LeanconvError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    try:
        importlib.metadata.version(_PACKAGES[name])
    except importlib.metadata.PackageNotFoundError:
        raise LeanconvError(f"runtime {name} is not installed; install it with: {_INSTALL[name]}") from None
    return name


def check_threads_batch(threads: Any, batch: Any) -> None:
    for label, value, top in (("threads", threads, MAX_THREADS), ("batch", batch, MAX_BATCH)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise LeanconvError(f"{label} must be a whole number from 1 to {top}, got {value!r}")


# glibc's mallopt parameters: memory freed below the mmap threshold stays in the heap, and the
# heap is not trimmed back to the system until this much is free
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 * 2**20, 2**30  # 32 MiB is glibc's largest mmap threshold
STEADY_ALLOCATOR = "glibc malloc keeps freed memory"
STEADY_ALLOCATOR_ENV = f"MALLOC_MMAP_THRESHOLD_={_MMAP_THRESHOLD} MALLOC_TRIM_THRESHOLD_={_TRIM_THRESHOLD}"


@functools.cache
def steady_allocator() -> str | None:
    """Make glibc keep freed memory in this process (once; what ``STEADY_ALLOCATOR_ENV`` does
    for a deployed one); returns what was set, or None where the C library is not glibc.

    Eager PyTorch allocates every activation anew. With glibc's defaults, buffers of a few MB
    are returned to the system when freed (its mmap threshold moves with the sizes it has seen,
    and the heap is trimmed) and the next call faults its pages in again: the trained ResNet-20
    at batch 64 measured 58.6-65.7 ms in two processes against 48.6 ms with freed memory kept,
    and which widths hit that cost depends on the process's history, so a pruned model could
    look 11% faster than the unpruned one and run 7% slower once memory is kept. Timing on
    ``torch`` therefore keeps freed memory (the process's peak memory stays reserved)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, gnu = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None
    gnu.restype = ctypes.c_char_p
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return None
    log.debug("glibc %s: mallopt mmap threshold %d, trim threshold %d", gnu().decode(), _MMAP_THRESHOLD,
              _TRIM_THRESHOLD)
    return STEADY_ALLOCATOR


def runtime_version(name: str) -> str:
    """The runtime's package version; for ``torch`` also the allocator setting its timings use."""
    version = importlib.metadata.version(_PACKAGES[check_runtime(name)])
    allocator = steady_allocator() if name == "torch" else None
    return f"{version} ({allocator})" if allocator else version


@dataclass
class Prepared:
    """One model made ready on one runtime: ``call()`` runs the model on a fixed random batch."""

    runtime: str
    threads: int
    batch: int
    call: Callable[[], Any]
    layout: str  # "channels_last" or "contiguous": the layout the runtime was given


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _batch(shape: Sequence[int], batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=gen)


def _torch(model: nn.Module, x: torch.Tensor) -> tuple[Callable[[], Any], str]:
    from leanconv.deploy.fold import fold_batchnorm  # deploy imports cost's siblings; keep this one-way

    steady_allocator()
    net = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        net = fold_batchnorm(net, x[:1])
    layout = "contiguous"
    if x.dim() == 4:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        layout = "channels_last"

    def call() -> Any:
        with torch.inference_mode():
            return net(x)
    return call, layout


def _onnx_file(model: nn.Module, x: torch.Tensor, folder: str) -> Path:
    """``model`` as an ONNX file in ``folder``: a bare conv or linear layer written directly
    (:mod:`leanconv.cost.layer_graph`, the latency table's many single layers), anything else
    through the exporter."""
    from leanconv.deploy.onnx import write_for_runtime

    path = Path(folder) / "model.onnx"
    graph = layer_onnx(model, x)
    if graph is None:
        return write_for_runtime(model, x, path)
    path.write_bytes(graph)
    return path


def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int) -> tuple[Callable[[], Any], str]:
    import onnxruntime as ort  # heavy import, only when asked for

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="leanconv-ort-") as folder:
        path = _onnx_file(model, x, folder)
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return (lambda: session.run(None, feed)), "contiguous"


def _openvino(model: nn.Module, x: torch.Tensor, threads: int) -> tuple[Callable[[], Any], str]:
    import openvino as ov  # optional extra

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="leanconv-ov-") as folder:
        net = core.read_model(str(_onnx_file(model, x, folder)))
        # float32 like the other runtimes: the CPU plugin's default is bfloat16 on CPUs that have it
        compiled = core.compile_model(net, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                   "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    data = np.ascontiguousarray(x.numpy())
    return (lambda: request.infer([data])), "contiguous"


def prepare(model: nn.Module, input_shape: Sequence[int], *, runtime: str = DEFAULT_RUNTIME, threads: int = 1,
            batch: int = 1) -> Prepared:
    """``model`` (not changed) ready to run on ``runtime`` with ``threads`` threads on a
    random float32 batch of ``batch`` images of ``input_shape``; the first call has been made,
    so a model the runtime cannot run fails here, in one line."""
    check_runtime(runtime)
    check_threads_batch(threads, batch)
    shape = check_shape(input_shape)
    x = _batch(shape, batch)
    try:
        with eval_mode(model), torch_threads(threads):
            if runtime == "torch":
                call, layout = _torch(model, x)
            elif runtime == "onnxruntime":
                call, layout = _onnxruntime(model, x, threads)
            else:
                call, layout = _openvino(model, x, threads)
            call()
    except LeanconvError:
        raise
    except Exception as exc:  # each runtime raises its own exception types
        if is_os_failure(exc):  # a full disk or file-size limit on the temporary ONNX file: exit 1, not the model
            raise os_error(exc, tempfile.gettempdir()) from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeanconvError(f"{runtime} cannot run this model: {text}") from exc
    return Prepared(runtime, threads, batch, call, layout)
