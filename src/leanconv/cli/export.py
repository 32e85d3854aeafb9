"""``leanconv export CKPT --onnx OUT.onnx``: ONNX export, checked against PyTorch, with ORT latency.

Export a model to one self-contained ONNX file with a dynamic batch axis, run it in ONNX
Runtime on a random batch and compare with PyTorch (the file is written only when the
largest absolute difference is at most {tolerance} times the largest output magnitude, and
at most {tolerance} for outputs below 1), then measure ONNX Runtime CPU latency
at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import json

from leanconv.cli.common import (add_build_args, add_model_args, input_shape_of, load_model, parse_kwargs, parse_shape,
                                 repeats_arg, threads_arg, whole_number)
from leanconv.deploy.onnx import OPSETS, TOLERANCE, export_onnx
from leanconv.util import checks

__all__ = ["HELP", "add_arguments", "run"]


HELP = "export to ONNX, check it against PyTorch, time it in ONNX Runtime"
DOC_FIELDS = {"tolerance": f"{TOLERANCE:g}"}  # filled into the --help text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="CKPT",
                   help="a checkpoint file (or a zoo model name or PKG.MODULE:FN, freshly initialised)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--opset", type=whole_number, default=None,
                   help=f"ONNX opset, {OPSETS[0]} to {OPSETS[-1]} (default: the exporter's; below 18 the TorchScript "
                   "exporter is used)")
    p.add_argument("--no-latency", action="store_true", help="skip the ONNX Runtime latency measurement")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="input shape (default: the checkpoint's; 3,32,32 for zoo names)")
    p.add_argument("--repeats", type=repeats_arg, default=20, help="timed runs per batch size (default: 20)")
    p.add_argument("--threads", type=threads_arg, default=None, help="CPU threads (default: PyTorch's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_args(p)
    add_build_args(p)
    p.set_defaults(out_file="onnx")


def _describe(result: dict) -> str:
    size = result["bytes"] / 2**20
    batch = "dynamic batch" if result["dynamic_batch"] else "batch 1"
    lines = [f"wrote {result['path']} ({size:.2f} MiB, opset {result['opset']}, {batch}, "
             f"{result['exporter']} exporter, {result['export_seconds']:.1f} s)",
             f"max abs diff vs PyTorch: {result['max_abs_diff']:.3g} on a batch of {result['check_batch']} "
             f"(limit {result['limit']:.3g})"]
    for stats in result["latency_ms"].values():
        lines.append(f"ONNX Runtime latency batch {stats['batch_size']}: median {stats['median_ms']:.3f} ms "
                     f"(p10 {stats['p10_ms']:.3f} - p90 {stats['p90_ms']:.3f} ms; {stats['repeats']} repeats, "
                     f"{stats['threads']} thread{'s' if stats['threads'] != 1 else ''})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.opset is not None:
        checks.whole(args.opset, "--opset", at_least=OPSETS[0], at_most=OPSETS[-1])
    model = load_model(args.model, constructor=args.constructor, input_shape=args.input_shape,
                       kwargs=parse_kwargs(args.arg))
    shape = input_shape_of(model, args.input_shape)
    result = export_onnx(model, shape, args.onnx, opset=args.opset, latency=not args.no_latency,
                         repeats=args.repeats, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else _describe(result))
    return 0
