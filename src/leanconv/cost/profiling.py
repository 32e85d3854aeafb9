"""One JSON-able cost profile of a model (counts, activation memory, measured latency) and
its human-readable table.

Key names carry their units: ``macs`` are multiply-accumulates, ``flops`` are 2 x MACs,
``activation_memory_bytes`` are bytes for one image, ``latency_ms`` are milliseconds per
batch. The same words appear in a ``units`` entry so that a JSON record explains itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanconv.cost.counting import count
from leanconv.cost.latency import measure_latency, measure_onnx_latency
from leanconv.cost.memory import activation_memory

__all__ = ["profile", "format_profile", "UNITS"]

UNITS = {
    "params": "count of parameters (shared tensors once)",
    "macs": "multiply-accumulates for one image",
    "flops": "floating-point operations for one image = 2 x MACs",
    "activation_memory_bytes": "bytes for one image at inference (peak live, total allocated)",
    "latency_ms": "milliseconds per forward pass of a whole batch",
}


def profile(model: nn.Module, input_shape: Sequence[int], *, latency: bool = True,
            batch_sizes: Sequence[int] = (1, 64), repeats: int = 20, warmup: int = 5,
            threads: int | None = None, channels_last: bool = True,
            onnx_path: str | Path | None = None) -> dict[str, Any]:
    """Everything leanconv measures about ``model`` on images of shape ``input_shape`` (C, H, W).

    Returns ``{"params", "macs", "flops", "input_shape", "activation_memory_bytes":
    {"peak", "total", "input"}, "latency_ms": {"batch1": stats, ...}, "threads", "units",
    "layers"}``; with ``onnx_path`` also ``"onnx_latency_ms"`` (same shape). Without
    ``latency`` the latency entries are empty dicts and ``threads`` is the current count."""
    report = count(model, input_shape)
    result: dict[str, Any] = {
        "params": report.params,
        "macs": report.macs,
        "flops": report.flops,
        "input_shape": list(report.input_shape),
        "activation_memory_bytes": activation_memory(model, input_shape),
        "latency_ms": {},
        "threads": threads if threads is not None else torch.get_num_threads(),
        "units": dict(UNITS),
        "layers": [row.to_dict() for row in report.layers],
    }
    if onnx_path is not None:
        result["onnx_latency_ms"] = {}
    if not latency:
        return result
    for batch in batch_sizes:
        stats = measure_latency(model, input_shape, batch, warmup=warmup, repeats=repeats, threads=threads,
                                channels_last=channels_last)
        result["latency_ms"][f"batch{batch}"] = stats.to_dict()
        result["threads"] = stats.threads
        if onnx_path is not None:
            onnx = measure_onnx_latency(onnx_path, input_shape, batch, warmup=warmup, repeats=repeats,
                                        threads=stats.threads)
            result["onnx_latency_ms"][f"batch{batch}"] = onnx.to_dict()
    return result


def _human(n: float) -> str:
    """``40_800_000 -> '40.80 M'``: decimal prefixes K, M, G."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{int(n)} B"


def _layer_table(layers: list[dict[str, Any]], total_macs: int) -> list[str]:
    header = ("layer", "type", "output shape", "params", "MACs", "% MACs")
    rows = [header]
    for row in layers:
        shape = "x".join(str(s) for s in row["output_shape"]) if row.get("output_shape") else "-"
        share = 100.0 * row["macs"] / total_macs if total_macs else 0.0
        name = row["name"] + (f" (x{row['calls']})" if row.get("calls", 1) > 1 else "")
        rows.append((name, row["type"], shape, _human(row["params"]), _human(row["macs"]), f"{share:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(len(header))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _latency_lines(title: str, entries: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for stats in entries.values():
        lines.append(
            f"{title} batch {stats['batch_size']}: median {stats['median_ms']:.3f} ms "
            f"(p10 {stats['p10_ms']:.3f} - p90 {stats['p90_ms']:.3f} ms, min {stats['min_ms']:.3f} ms; "
            f"{stats['repeats']} repeats, {stats['threads']} threads, {stats['memory_format']})"
        )
    return lines


def format_profile(profile_dict: dict[str, Any]) -> str:
    """Render a :func:`profile` result as a per-layer table followed by totals and latency."""
    p = profile_dict
    lines = _layer_table(p.get("layers", []), p["macs"])
    shape = "x".join(str(s) for s in p.get("input_shape", []))
    lines += [
        "",
        f"input: {shape} (one image)",
        f"params: {_human(p['params'])} ({p['params']:,})",
        f"MACs: {_human(p['macs'])} multiply-accumulates; FLOPs: {_human(p['flops'])} (FLOPs = 2 x MACs)",
    ]
    memory = p.get("activation_memory_bytes")
    if memory:
        lines.append(f"activation memory: peak {_bytes(memory['peak'])}, total {_bytes(memory['total'])} (one image)")
    lines += _latency_lines("latency torch", p.get("latency_ms", {}))
    lines += _latency_lines("latency onnxruntime", p.get("onnx_latency_ms", {}))
    return "\n".join(lines)
