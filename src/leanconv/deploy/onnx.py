"""ONNX export with a numerical check against PyTorch and measured ONNX Runtime latency.

``export_onnx`` writes one self-contained ``.onnx`` file (weights inside, no external data)
with a dynamic batch axis, then runs it in onnxruntime on a random batch of a *different*
size than the one traced and compares with the PyTorch model in eval mode. The tolerance is
relative to the size of the outputs: a file whose largest absolute difference exceeds
``tolerance * max(1, largest |PyTorch output|)`` (``tolerance`` 1e-4 by default) is never
put in place. float32 rounding grows with the magnitudes it works on, so logits of 1e5 come
out of a correct export ~1e-2 apart; the floor of 1 keeps the limit absolute for small outputs,
where the hidden layers' rounding no longer shrinks with them. Export and check run on a
temporary file that is renamed only when the check passes.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), which handles
every leanconv layer (they switch to their dense reference formulation while exporting, since
the compiled sparse kernels cannot be traced). It emits opset 18 or newer; for an older
``opset`` the TorchScript exporter is used instead, because converting a dynamo graph down
is unreliable. The opset actually written is read back from the file and checked.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanconv.util.files import atomic_write, is_os_failure, os_error
from leanconv.util.model_io import check_shape, example_input, run_forward
from leanconv.util.timing import LatencyStats, check_counts, summarise, time_calls
from leanconv.errors import LeanconvError

__all__ = ["export_onnx", "write_for_runtime", "measure_onnx_latency", "DYNAMO_MIN_OPSET", "OPSETS", "TOLERANCE"]

log = logging.getLogger(__name__)

DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest native opset
OPSETS = range(7, 31)  # the opsets an export may ask for
TOLERANCE = 1e-4  # largest accepted |ONNX - PyTorch| over max(1, largest |PyTorch output|)
_INPUT, _OUTPUT = "input", "output"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (deprecation warnings, notices about optional
    torchvision ops) for the duration of one export; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_onnx(net: nn.Module, x: torch.Tensor, dest: str, opset: int | None, dynamic_batch: bool) -> str:
    """Export ``net`` traced on ``x`` to ``dest``; returns the exporter's name."""
    with _quiet_exporter():
        if opset is None or opset >= DYNAMO_MIN_OPSET:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            program = torch.onnx.export(net, (x,), None, dynamo=True, verbose=False, opset_version=opset,
                                        input_names=[_INPUT], output_names=[_OUTPUT], dynamic_shapes=shapes)
            program.save(dest, external_data=False)
            return "dynamo"
        axes = {_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(net, (x,), dest, dynamo=False, verbose=False, opset_version=opset,
                          input_names=[_INPUT], output_names=[_OUTPUT], dynamic_axes=axes)
        return "torchscript"


RUNTIME_OPSET = 17  # the TorchScript exporter: a fraction of a second per model, where the dynamo one takes seconds


def write_for_runtime(net: nn.Module, x: torch.Tensor, dest: Path) -> Path:
    """Write ``net`` (eval mode, traced on ``x``, its batch fixed) to ``dest`` for timing in a
    runtime: no output check and no atomic rename, for a temporary file. The fast TorchScript
    exporter first; the dynamo exporter where that one cannot export the model."""
    x = x.float()
    net = copy.deepcopy(net).float().eval()
    try:
        with torch.no_grad():
            _write_onnx(net, x, str(dest), RUNTIME_OPSET, dynamic_batch=False)
    except Exception:  # noqa: BLE001  an op the TorchScript exporter lacks: try the other exporter
        with torch.no_grad():
            _write_onnx(net, x, str(dest), None, dynamic_batch=False)
    return dest


def _outputs(value: Any) -> list[np.ndarray]:
    """A model's output(s) as a flat list of numpy arrays."""
    if isinstance(value, torch.Tensor):
        return [value.detach().float().numpy()]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _outputs(v)]
    if isinstance(value, dict):
        return [a for k in value for a in _outputs(value[k])]
    raise LeanconvError(f"cannot compare a model output of type {type(value).__name__} with ONNX")


def _compare(onnx_file: str, net: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Run ``onnx_file`` in onnxruntime on ``x``; return max |ONNX - PyTorch| and the largest
    |PyTorch output|, each over all outputs."""
    import onnxruntime as ort  # heavy import, only needed here

    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        want = _outputs(net(x))
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise LeanconvError(f"the ONNX model returns shapes {[g.shape for g in got]}, PyTorch "
                            f"{[w.shape for w in want]}; the export is wrong")
    diffs = [np.max(np.abs(g.astype(np.float64) - w)) for g, w in zip(got, want) if w.size]
    scales = [np.max(np.abs(w)) for w in want if w.size]
    return (float(np.max(diffs)) if diffs else 0.0), (float(np.max(scales)) if scales else 0.0)  # NaN stays NaN


def _opset_of(onnx_file: str) -> int:
    import onnx

    model = onnx.load(onnx_file, load_external_data=False)
    onnx.checker.check_model(model)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_args(input_shape: Sequence[int], opset: int | None, check_batch: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise LeanconvError(f"input shape {input_shape!r} must be integers such as (3, 32, 32)") from None
    if not shape or min(shape) < 1:
        raise LeanconvError(f"input shape {input_shape!r} must be positive integers such as (3, 32, 32)")
    if opset is not None and opset not in OPSETS:
        raise LeanconvError(f"ONNX opset {opset} is out of range; pick one from {OPSETS[0]} to {OPSETS[-1]} or leave "
                            "the default")
    if check_batch < 1:
        raise LeanconvError(f"check batch must be at least 1, got {check_batch}")
    return shape


def _export_and_check(net: nn.Module, shape: tuple[int, ...], path: Path, opset: int | None,
                      dynamic_batch: bool, check_batch: int, tolerance: float) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    trace_x = torch.randn((2 if dynamic_batch else 1, *shape), generator=gen)
    check_x = torch.randn((check_batch if dynamic_batch else 1, *shape), generator=gen)
    info: dict[str, Any] = {}

    def write(tmp: str) -> None:
        start = time.perf_counter()
        try:
            info["exporter"] = _write_onnx(net, trace_x, tmp, opset, dynamic_batch)
            info["opset"] = _opset_of(tmp)
        except LeanconvError:
            raise
        except Exception as exc:  # the exporters raise many types; the user needs one line
            if is_os_failure(exc):  # a full disk: a file-system error (exit 1), not the model's fault
                raise os_error(exc, path) from None
            raise LeanconvError(f"ONNX export failed: {_first_line(exc)}") from exc
        info["export_seconds"] = time.perf_counter() - start
        if opset is not None and info["opset"] != opset:
            raise LeanconvError(f"asked for ONNX opset {opset} but the exporter wrote {info['opset']}")
        info["max_abs_diff"], info["output_scale"] = _compare(tmp, net, check_x)
        info["limit"] = tolerance * max(1.0, info["output_scale"])  # a NaN difference fails the test below
        if not info["max_abs_diff"] <= info["limit"]:
            raise LeanconvError(f"ONNX output differs from PyTorch by {info['max_abs_diff']:.3g} (max abs) > "
                                f"{tolerance:g} x {max(1.0, info['output_scale']):.3g} (the largest |output|, at "
                                f"least 1); {path} was not written")

    atomic_write(path, write)
    info["check_batch"] = int(check_x.shape[0])
    return info


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path, *, opset: int | None = None,
                dynamic_batch: bool = True, tolerance: float = TOLERANCE, check_batch: int = 3,
                latency: bool = True, batch_sizes: Sequence[int] = (1, 64), repeats: int = 20,
                warmup: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Export ``model`` (eval mode, on CPU, float32; the caller's model is not changed) for
    images of ``input_shape`` (C, H, W) to ``path`` and check it (module docstring).

    ``dynamic_batch`` gives the input and output a symbolic batch axis (else batch 1 is fixed
    and only batch 1 is checked and timed). Unless ``latency`` is False, onnxruntime's CPU
    latency is measured for each of ``batch_sizes`` (median ms per batch, as
    :func:`measure_onnx_latency`). Returns ``{"path", "opset", "exporter",
    "input_shape", "dynamic_batch", "max_abs_diff", "output_scale", "limit", "check_batch",
    "tolerance", "bytes", "export_seconds", "latency_ms": {"batch1": stats, ...}}``, where
    ``output_scale`` is the largest |PyTorch output| and ``limit`` = ``tolerance * max(1,
    output_scale)`` the largest accepted ``max_abs_diff``. Raises :class:`LeanconvError` when
    export fails or the outputs differ by more than ``limit``."""
    shape = _check_args(input_shape, opset, check_batch)
    path = Path(path)
    net = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        run_forward(net, example_input(net, shape))  # an input shape that does not fit: one line, before export
    info = _export_and_check(net, shape, path, opset, dynamic_batch, check_batch, tolerance)
    result: dict[str, Any] = {"path": str(path), "opset": info["opset"], "exporter": info["exporter"],
                              "input_shape": list(shape), "dynamic_batch": dynamic_batch,
                              "max_abs_diff": info["max_abs_diff"], "output_scale": info["output_scale"],
                              "limit": info["limit"], "check_batch": info["check_batch"],
                              "tolerance": tolerance, "bytes": path.stat().st_size,
                              "export_seconds": info["export_seconds"], "latency_ms": {}}
    log.info("exported %s (opset %d, %s exporter): max abs diff %.3g", path, info["opset"], info["exporter"],
             info["max_abs_diff"])
    if latency:
        for batch in batch_sizes if dynamic_batch else [1]:
            stats = measure_onnx_latency(path, shape, batch, warmup=warmup, repeats=repeats, threads=threads)
            result["latency_ms"][f"batch{batch}"] = stats.to_dict()
    return result


def _onnx_session(onnx_path: Path, threads: int) -> Any:
    import onnxruntime as ort  # heavy import, only needed here

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise LeanconvError(f"onnxruntime cannot load {onnx_path}: {str(exc).strip().splitlines()[0]}") from exc


def measure_onnx_latency(onnx_path: str | Path, input_shape: Sequence[int], batch_size: int, *, warmup: int = 5,
                         repeats: int = 20, threads: int | None = None) -> LatencyStats:
    """Time an ONNX model with onnxruntime's CPU provider on a random float32 batch
    ``[batch_size, *input_shape]`` (NCHW). ``threads`` (default: ``torch.get_num_threads()``,
    so both backends compare on equal terms) becomes ``intra_op_num_threads``."""
    shape = check_shape(input_shape)
    check_counts(batch_size, warmup, repeats, threads)
    path = Path(onnx_path)
    if not path.is_file():
        raise LeanconvError(f"ONNX file {path} does not exist")
    used = threads if threads is not None else torch.get_num_threads()
    session = _onnx_session(path, used)
    first = session.get_inputs()[0]
    fixed_batch = first.shape[0] if first.shape else None
    if isinstance(fixed_batch, int) and fixed_batch != batch_size:
        raise LeanconvError(f"{path} was exported with a fixed batch of {fixed_batch}, not {batch_size}; "
                            "export it with a dynamic batch axis")
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    feed = {first.name: x}
    try:
        session.run(None, feed)
    except Exception as exc:
        raise LeanconvError(f"onnxruntime failed on input {tuple(x.shape)}: {str(exc).strip().splitlines()[0]}") from exc
    times = time_calls(lambda: session.run(None, feed), warmup, repeats)
    return summarise(times, used, batch_size, "contiguous", "onnxruntime")
