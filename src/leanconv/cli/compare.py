"""``leanconv compare CKPT``: every method at the same budgets and fine-tuning, one report.

Prune/convert a trained checkpoint with every method (width criteria hap, hap+implant, l1,
taylor, random, ...; 3-D pruning; SCC and pSConv layers), each with the same fine-tuning
budget: a latency budget (--target-latency, measured on --runtime) or a MACs budget
(--target-flops); measure accuracy, params, MACs and latency, every model timed side by side
with the baseline in interleaved rounds (PyTorch, ONNX Runtime, and --runtime); write
DIR/results.jsonl and DIR/report.html + DIR/report.md. Resumable: a finished entry is never
redone, and a re-run may add methods or budgets; a DIR made with another checkpoint, data or
fine-tuning settings is refused (use a new --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanconv.cli.common import (add_checkpoint_args, add_config_options, add_data_args, add_output_args, build_config,
                                 list_arg, progress_bar, source_from_args)
from leanconv.report.build import build_report
from leanconv.runs.compare import CompareConfig, parse_budgets, run_compare
from leanconv.runs.config import command_line
from leanconv.runs.latency import LatencyBudget
from leanconv.runs.source import Source
from leanconv.util.inputs import input_file

__all__ = ["HELP", "add_arguments", "run", "compare_and_report"]


HELP = "run every method at the same budgets and write a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    budget = p.add_mutually_exclusive_group()
    budgets = list_arg(parse_budgets, "comma-separated fractions such as 0.5,0.33")
    budget.add_argument("--target-latency", type=budgets, metavar="R[,R...]",
                        help="latency budgets: fractions of the baseline's latency measured on --runtime at --threads "
                        "and --batch (width methods are solved for it and measured; 3d aims at MACs R)")
    budget.add_argument("--target-flops", type=budgets, metavar="R[,R...]",
                        help="MACs/FLOPs budgets as fractions of the original (default 0.5)")
    add_config_options(p, CompareConfig)
    add_data_args(p, default=None, batch_size=False)  # every entry uses leanconv's fixed batch of 128
    add_output_args(p)


def compare_and_report(source: Source, config: CompareConfig, out: Path, *, show_progress: bool,
                       command: str | None = None) -> dict:
    """Run the comparison of ``source`` into ``out`` and build the report; returns the paths.
    ``command`` is what the report shows as the command behind it (default: the compare command)."""
    update, close = progress_bar("compare", enabled=show_progress)

    def stage(done: int, total: int, key: str) -> None:
        if show_progress and key != "done":
            close()
            print(f"leanconv compare [{done + 1}/{total}] {key}", file=sys.stderr, flush=True)

    try:
        run_compare(config, source, out=out, command=command or command_line(config, source, out), progress=update,
                    stage=stage)
    finally:
        close()
    return build_report(out)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    if args.target_latency is not None:
        return build_config(CompareConfig, args, budget="latency", targets=args.target_latency)
    if args.target_flops is not None:
        return build_config(CompareConfig, args, targets=args.target_flops)
    return build_config(CompareConfig, args)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.latency_table is not None:  # refused before any work when it cannot serve
        LatencyBudget(config.runtime, config.threads, config.latency_batch, config.latency_table).check_table()
    input_file(args.ckpt, "checkpoint")
    source = source_from_args(args, args.ckpt)
    paths = compare_and_report(source, config, Path(args.out), show_progress=not args.no_progress)
    print(f"report: {paths['html']}")
    return 0
