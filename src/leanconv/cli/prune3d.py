"""``leanconv prune3d CKPT``: choose depth x width x resolution together under a FLOPs or latency budget.

Three-dimensional pruning (Wang et al., ICML 2021). Prunes the trained model step by step
along depth, width and input resolution (plus a few mixed points), fine-tunes briefly after
each step and records validation accuracy as samples (DIR/samples.jsonl, resumable); fits a
polynomial accuracy predictor; maximises it under the MACs budget (FLOPs = 2 x MACs, same
ratio); realises the choice, re-solving until the counted MACs meet the budget; fine-tunes
and measures. With ``--target-latency R`` the budget is R of the unpruned model's latency
measured on ``--runtime`` (``--runtime-threads``, ``--batch``): each point costs its latency
timed side by side with the unpruned model (predicted by the runtime's latency table when
sample tasks run in parallel), width is cut on the runtime's channel staircase, and the
choice and two alternatives are timed side by side with the unpruned model: the most
accurate within the target is kept, else the solver chooses again tighter
(:mod:`leanconv.prune3d.latency`). Writes DIR/model.safetensors,
DIR/record.json, DIR/surface.png and DIR/budget.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from leanconv.cli.common import (add_checkpoint_args, add_config_options, add_data_args, add_output_args, build_config,
                                 progress_bar, source_from_args, threads_arg, workers_arg)
from leanconv.prune3d.executors import EXECUTORS, create_executor
from leanconv.report.plots3d import prune3d_plot_writers
from leanconv.runs.prune3d import Prune3dConfig, run_prune3d

__all__ = ["HELP", "add_arguments", "run"]


HELP = "3-D pruning: depth x width x resolution under a FLOPs or latency budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-latency", type=float, metavar="R",
                        help="run in at most this fraction of the unpruned model's latency, measured on --runtime "
                        "at --runtime-threads and --batch")
    budget.add_argument("--target-flops", type=float, metavar="R",
                        help="keep this fraction of the FLOPs/MACs (the default budget: 0.33)")
    add_config_options(p, Prune3dConfig)
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where sample tasks run: local processes or a Ray cluster (default: local)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (host:port or auto; default: start a local Ray instance)")
    p.add_argument("--workers", type=workers_arg, default=None, metavar="N",
                   help="parallel sample tasks (local: default 1, 0 = in this process; ray: default and 0 = all CPUs)")
    p.add_argument("--threads", type=threads_arg, default=None, metavar="T",
                   help="torch threads per task (default: CPUs / workers locally, 1 on Ray)")
    add_data_args(p, default=None, batch_size=False)
    add_output_args(p)


def _executor(args: argparse.Namespace):
    if args.executor == "ray":
        return create_executor("ray", workers=args.workers or None, address=args.ray_address, threads=args.threads or 1)
    workers = 1 if args.workers is None else args.workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    return create_executor("local", workers=workers, address=args.ray_address, threads=threads)


def config_from_args(args: argparse.Namespace) -> Prune3dConfig:
    if args.target_latency is not None:
        return build_config(Prune3dConfig, args, kind="latency", target=args.target_latency)
    if args.target_flops is not None:
        return build_config(Prune3dConfig, args, kind="macs", target=args.target_flops)
    return build_config(Prune3dConfig, args)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    executor = _executor(args)
    source = source_from_args(args, args.ckpt)  # the data must fit, before any work
    update, close = progress_bar("prune3d samples", enabled=not args.no_progress)

    def stage(text: str) -> None:
        if not args.no_progress:
            close()  # the sample bar is done once a later stage starts
            print(f"leanconv: {text}", file=sys.stderr, flush=True)

    try:
        result = run_prune3d(config, source, out=args.out, executor=executor, progress=update, stage=stage)
    finally:
        close()
    record = result.record.to_dict()
    result.save(args.out, constructor=args.constructor, extra=prune3d_plot_writers(record))
    choice, acc = record["choice"], record["accuracy"]
    print(json.dumps({"d": round(choice["d"], 4), "w": round(choice["w"], 4), "r": round(choice["r"], 4),
                      "side": choice["realised"]["side"], "macs": [record["before"]["macs"], record["after"]["macs"]],
                      "macs_ratio": round(record["achieved"]["macs"], 4),
                      "val_accuracy": {"predicted": round(acc["predicted_val"], 2),
                                       "measured": round(acc["measured_val_protocol"], 2)},
                      "test_accuracy": [round(acc["test_before"], 2), round(acc["test_after"], 2)],
                      "speedup_batch64": round(record["speedup_batch64"], 3),
                      **_latency_summary(record), "out": str(args.out)}))
    return 0


def _latency_summary(record: dict) -> dict:
    """A latency budget's target and the last side-by-side measurement (median and spread)."""
    budget = record.get("latency_budget")
    if not budget:
        return {}
    measured = budget["attempts"][-1]["measured"]
    return {"runtime": budget["runtime"], "batch": budget["batch"], "target_latency": record["config"]["target"],
            "latency_ratio": [round(measured[k], 3) for k in ("median", "low", "high")]}
