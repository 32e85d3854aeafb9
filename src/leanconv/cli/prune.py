"""``leanconv prune CKPT``: remove channels physically to a latency, MACs or params budget.

With ``--target-latency R`` the result runs in at most R of the unpruned model's time,
measured on ``--runtime`` (ONNX Runtime by default) at ``--threads`` and ``--batch``
(:mod:`leanconv.runs.latency`). With ``--target-flops``/``--target-params``, channel groups are
ranked globally with a criterion and the least important removed until the counted MACs (FLOPs
= 2 x MACs, same ratio) or params land within 2% of the target, optionally implanting the most
sensitive pruned channels (HAP Neural Implant). Then: fine-tune, re-estimate BatchNorm
statistics, measure, and time the result side by side with the unpruned model. Writes
DIR/model.safetensors, DIR/record.json and DIR/channels.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanconv.cli.common import (add_checkpoint_args, add_config_options, add_data_args, add_output_args, build_config,
                                 progress_bar, source_from_args)
from leanconv.cost import simd_channels
from leanconv.report.plots import channels_chart
from leanconv.runs.prune import PruneConfig, run_prune

__all__ = ["HELP", "add_arguments", "run"]


HELP = "remove channels to a latency, FLOPs or params budget (hap, l1, taylor, ...)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-latency", type=float, metavar="R",
                        help="run in at most this fraction of the unpruned model's latency, measured on --runtime "
                        "at --threads and --batch")
    budget.add_argument("--target-flops", type=float, metavar="R", help="keep this fraction of the FLOPs/MACs")
    budget.add_argument("--target-params", type=float, metavar="R", help="keep this fraction of the parameters")
    add_config_options(p, PruneConfig)
    add_data_args(p, default=None, batch_size=False)
    add_output_args(p)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    if args.target_latency is not None:
        kind, target = "latency", args.target_latency
    elif args.target_flops is not None:
        kind, target = "macs", args.target_flops
    else:
        kind, target = "params", args.target_params
    return build_config(PruneConfig, args, kind=kind, target=target)


def _hint_alignment(layers: dict[str, list[int]], round_to: int | None) -> None:
    """Say (stderr, not an error) when unaligned channel counts will cost speed on this CPU."""
    block = simd_channels()
    off = [n for n, (before, after) in layers.items() if after != before and after % block]
    if round_to is None and off:
        print(f"leanconv: note: {len(off)} pruned layers keep channel counts that are not multiples of {block}; "
              f"this CPU computes convs in blocks of {block} output channels (PyTorch and ONNX Runtime alike), so "
              "--round-to auto gives more speed for the same MACs", file=sys.stderr)


def _hint_no_implant(record: dict, config: PruneConfig) -> None:
    """Say (stderr) when ``--implant`` ended up implanting nothing, and the likely reason."""
    if config.implant > 0 and not any(any(r["implanted"].values()) for r in record["rounds"]):
        why = (f" (with --round-to {config.round_to} a group implants whole multiples of {config.round_to} channels; "
               "raise --implant or drop --round-to)" if config.round_to else "")
        print(f"leanconv: note: --implant {config.implant:g} implanted no channels{why}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.budget().check_table()  # a --latency-table that cannot serve is refused before any work
    source = source_from_args(args, args.ckpt)
    update, close = progress_bar(f"prune {config.method}", enabled=not args.no_progress)
    stage = (lambda text: None) if args.no_progress else (lambda text: print(f"leanconv: {text}", file=sys.stderr, flush=True))
    out = Path(args.out)
    try:
        result = run_prune(config, source, out=out, progress=update, stage=stage)
    finally:
        close()
    record = result.record.to_dict()
    title = f"{config.method}: output channels per layer (target {config.target:g} of {config.kind})"
    result.save(out, constructor=args.constructor,
                extra={"channels.png": lambda p: channels_chart(record["layers"], p, title=title)})
    if config.kind != "latency":  # a latency budget keeps only counts on the measured staircase
        _hint_alignment(record["layers"], config.round_to)
    _hint_no_implant(record, config)
    b, a = record["before"], record["after"]
    print(json.dumps({"method": config.method, "macs": [b["macs"], a["macs"]], "params": [b["params"], a["params"]],
                      "accuracy": [round(b["test_accuracy"], 2), round(a["test_accuracy"], 2)],
                      "mac_reduction": round(record["mac_reduction"], 3),
                      "speedup_batch1": round(record["speedup_batch1"], 3),
                      "speedup_batch64": round(record["speedup_batch64"], 3), "runtime": record["runtime"],
                      "out": str(out)}))
    return 0
