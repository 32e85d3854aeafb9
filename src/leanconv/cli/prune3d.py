"""``leanconv prune3d CKPT``: choose depth x width x resolution together under a FLOPs budget."""

from __future__ import annotations

import argparse
import json
import os
import sys

from leanconv import checkpoint
from leanconv.cli.common import (add_data_args, add_output_args, add_repeats_arg, add_seed_arg, data_for_meta,
                                 fraction, positive_float, positive_int, progress_bar)
from leanconv.errors import LeanconvError
from leanconv.importance import criterion_names
from leanconv.report.plots3d import prune3d_plots
from leanconv.prune3d.executors import EXECUTORS, create_executor
from leanconv.prune3d.three_d import Prune3dConfig, run_prune3d

__all__ = ["register", "run", "config_from_args"]


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune3d", help="3-D pruning: depth x width x resolution under a FLOPs budget",
                       description="Three-dimensional pruning (Wang et al., ICML 2021). Prunes the trained model "
                       "step by step along depth, width and input resolution (plus a few mixed points), fine-tunes "
                       "briefly after each step and records validation accuracy as samples (DIR/samples.jsonl, "
                       "resumable); fits a polynomial accuracy predictor; maximises it under the MACs budget "
                       "(FLOPs = 2 x MACs, same ratio); realises the choice, re-solving until the counted MACs meet "
                       "the budget; fine-tunes and measures. Writes DIR/model.safetensors, DIR/record.json, "
                       "DIR/surface.png and DIR/budget.png.")
    p.add_argument("ckpt", metavar="CKPT", help="a trained leanconv checkpoint")
    p.add_argument("--target-flops", type=fraction, required=True, metavar="R", help="keep this fraction of the FLOPs/MACs")
    p.add_argument("--samples", type=positive_int, default=16, metavar="N",
                   help="samples to collect, the unpruned point included (default: 16)")
    p.add_argument("--mixed", type=_whole, default=None, metavar="M",
                   help="of which mixed (d, w, r) points (default: a quarter of the rest)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where sample tasks run: local processes or a Ray cluster (default: local)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (host:port or auto; default: start a local Ray instance)")
    p.add_argument("--workers", type=_whole, default=None, metavar="N",
                   help="parallel sample tasks (local default: 1, 0 = in this process; ray default: all CPUs)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="T",
                   help="torch threads per task (default: CPUs / workers locally, 1 on Ray)")
    p.add_argument("--method", default="hap", choices=criterion_names(), help="channel criterion (default: hap)")
    p.add_argument("--sample-epochs", type=_whole, default=1, metavar="E",
                   help="brief fine-tuning epochs after each sampling step (default: 1)")
    p.add_argument("--sample-images", type=positive_int, default=2000, metavar="N",
                   help="training images per brief fine-tuning epoch (default: 2000)")
    p.add_argument("--finetune-epochs", type=_whole, default=3, metavar="N",
                   help="final fine-tuning epochs on the whole training split (default: 3)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="fine-tuning learning rate (default: 0.01)")
    p.add_argument("--score-images", type=positive_int, default=512, help="validation images for scores (default: 512)")
    p.add_argument("--probes", type=positive_int, default=32, help="cap on Hutchinson probes for hap (default: 32)")
    p.add_argument("--w-min", type=fraction, default=0.4, help="smallest width in the search box (default: 0.4)")
    p.add_argument("--r-min", type=fraction, default=0.5, help="smallest resolution ratio (default: 0.5; side >= 8)")
    p.add_argument("--min-blocks-per-stage", type=positive_int, default=1, help="blocks each stage keeps (default: 1)")
    p.add_argument("--full-box", action="store_true",
                   help="sample width and resolution down to --w-min/--r-min (default: only to just below "
                        "the level that alone meets the budget)")
    add_seed_arg(p)
    add_repeats_arg(p)
    add_data_args(p, default=None)
    add_output_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Prune3dConfig:
    if not args.lr > 0:
        raise LeanconvError(f"--lr must be positive, got {args.lr}")
    return Prune3dConfig(target=args.target_flops, samples=args.samples, mixed=args.mixed, method=args.method,
                         sample_epochs=args.sample_epochs, sample_images=args.sample_images,
                         finetune_epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                         score_images=args.score_images, probes=args.probes, w_min=args.w_min, r_min=args.r_min,
                         clip_box=not args.full_box, min_blocks_per_stage=args.min_blocks_per_stage, seed=args.seed,
                         latency_repeats=args.repeats)


def _executor(args: argparse.Namespace):
    if args.executor == "ray":
        return create_executor("ray", workers=args.workers or None, address=args.ray_address, threads=args.threads or 1)
    workers = 1 if args.workers is None else args.workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    return create_executor("local", workers=workers, address=args.ray_address, threads=threads)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    executor = _executor(args)
    header = checkpoint.read_header(args.ckpt)  # one line if missing or not a checkpoint
    data_for_meta(header.get("meta", {}), args)  # the data must fit, before any work
    update, close = progress_bar("prune3d samples", enabled=not args.no_progress)

    def stage(text: str) -> None:
        if not args.no_progress:
            close()  # the sample bar is done once a later stage starts
            print(f"leanconv: {text}", file=sys.stderr, flush=True)

    try:
        result = run_prune3d(args.ckpt, args.out, config, executor=executor, data=args.data, data_dir=args.data_dir,
                             progress=update, stage=stage)
    finally:
        close()
    record = result.record
    prune3d_plots(record, args.out)
    choice, acc = record["choice"], record["accuracy"]
    print(json.dumps({"d": round(choice["d"], 4), "w": round(choice["w"], 4), "r": round(choice["r"], 4),
                      "side": choice["realised"]["side"], "macs": [record["before"]["macs"], record["after"]["macs"]],
                      "macs_ratio": round(record["achieved"]["macs"], 4),
                      "val_accuracy": {"predicted": round(acc["predicted_val"], 2),
                                       "measured": round(acc["measured_val_protocol"], 2)},
                      "test_accuracy": [round(acc["test_before"], 2), round(acc["test_after"], 2)],
                      "speedup_batch64": round(record["speedup_batch64"], 3), "out": str(args.out)}))
    return 0
