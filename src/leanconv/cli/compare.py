"""``leanconv compare CKPT``: every method at the same budgets and fine-tuning, one report."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from leanconv.cli.common import (add_data_args, add_model_args, add_output_args, add_seed_arg, data_from_meta,
                                 input_shape_of, load_model, positive_float, positive_int, progress_bar,
                                 recorded_data_dir, resolution_of)
from leanconv.runs.compare import CONTENDERS, DEFAULT_METHODS, CompareConfig, run_compare
from leanconv.errors import LeanconvError
from leanconv.report.build import build_report

__all__ = ["register", "run", "parse_targets", "compare_and_report"]


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"targets must be numbers like 0.5,0.33, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every target must lie strictly between 0 and 1, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run every method at the same budgets and write a report",
                       description="Prune/convert a trained checkpoint with every method (width criteria hap, "
                       "hap+implant, l1, taylor, random, ...; 3-D pruning; SCC and pSConv layers), each with the "
                       "same fine-tuning budget; measure accuracy, params, MACs and latency (PyTorch and ONNX "
                       "Runtime); write DIR/results.jsonl and DIR/report.html + DIR/report.md. Resumable: a "
                       "finished entry is never redone, and a re-run may add methods or budgets; a DIR made "
                       "with another checkpoint, data or fine-tuning settings is refused (use a new --out).")
    p.add_argument("ckpt", metavar="CKPT")
    add_model_args(p)
    p.add_argument("--target-flops", type=parse_targets, default=(0.5,), metavar="R[,R...]",
                   help="MACs/FLOPs budgets as fractions of the original (default: 0.5)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(CONTENDERS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs for every entry (default: 1)")
    p.add_argument("--finetune-lr", type=positive_float, default=0.01)
    p.add_argument("--probes", type=positive_int, default=32, help="Hutchinson probe cap (default: 32)")
    p.add_argument("--score-images", type=positive_int, default=512)
    p.add_argument("--samples", type=positive_int, default=6, help="3-D pruning samples (default: 6)")
    p.add_argument("--train-subset", type=positive_int, default=None, help="fine-tune on this many images only")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX export and ONNX Runtime latency")
    p.add_argument("--quick", action="store_true", help="label the report as a quick run with tiny budgets")
    add_seed_arg(p)
    add_data_args(p, default=None, batch_size=False)  # every entry uses leanconv's fixed batch of 128
    add_output_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return CompareConfig(targets=args.target_flops, methods=methods, finetune_epochs=args.finetune_epochs,
                         finetune_lr=args.finetune_lr, probes=args.probes, score_images=args.score_images,
                         train_subset=args.train_subset, samples=args.samples, onnx=not args.no_onnx,
                         quick=args.quick, seed=args.seed)


def compare_and_report(ckpt: str, config: CompareConfig, out: Path, *, data_args: argparse.Namespace,
                       constructor: str | None, show_progress: bool, command: str) -> dict:
    """Load ``ckpt``, run the comparison into ``out`` and build the report; returns the paths."""
    model = load_model(ckpt, constructor=constructor)
    data = data_from_meta(model, data_args)
    shape = input_shape_of(model)
    update, close = progress_bar("fine-tune", enabled=show_progress)

    def stage(done: int, total: int, key: str) -> None:
        if show_progress and key != "done":
            close()
            print(f"leanconv compare [{done + 1}/{total}] {key}", file=sys.stderr, flush=True)

    try:
        run_compare(ckpt, data, shape, out, config, resolution=resolution_of(model, data), command=command,
                    constructor=constructor, data_dir=recorded_data_dir(model.leanconv_meta, data_args),
                    progress=update, stage=stage)
    finally:
        close()
    return build_report(out)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not Path(args.ckpt).is_file():
        raise LeanconvError(f"checkpoint {args.ckpt!r} does not exist")
    command = shlex.join(["leanconv", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("leanconv") else \
        f"leanconv compare {shlex.quote(args.ckpt)} --out {shlex.quote(args.out)}"
    paths = compare_and_report(args.ckpt, config, Path(args.out), data_args=args, constructor=args.constructor,
                               show_progress=not args.no_progress, command=command)
    print(f"report: {paths['html']}")
    return 0
