"""``leanconv prune CKPT``: remove channels physically to a MACs or params budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanconv import checkpoint
from leanconv.util.files import write_json, write_together
from leanconv.cli.common import (add_data_args, add_model_args, add_output_args, add_repeats_arg, add_seed_arg,
                                 data_from_meta, fraction, input_shape_of, load_model, positive_float,
                                 positive_int, progress_bar, resolution_of)
from leanconv.cost import simd_channels
from leanconv.errors import LeanconvError
from leanconv.importance import criterion_names
from leanconv.runs.prune import PruneConfig, run_pruning
from leanconv.report.plots import channels_chart

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels to a FLOPs/params budget (hap, l1, taylor, ...)",
                       description="Rank channel groups globally with a criterion, remove the least important "
                       "physically until the counted MACs (FLOPs = 2 x MACs, same ratio) or params land within 2% "
                       "of the target, optionally implant the most sensitive pruned channels (HAP Neural "
                       "Implant), fine-tune, re-estimate BatchNorm statistics, and measure. Writes "
                       "DIR/model.safetensors, DIR/record.json and DIR/channels.png.")
    p.add_argument("ckpt", metavar="CKPT", help="a trained leanconv checkpoint")
    add_model_args(p)
    p.add_argument("--method", default="hap", choices=criterion_names(), help="importance criterion (default: hap)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-flops", type=fraction, metavar="R", help="keep this fraction of the FLOPs/MACs")
    budget.add_argument("--target-params", type=fraction, metavar="R", help="keep this fraction of the parameters")
    p.add_argument("--implant", type=float, default=0.0, metavar="F",
                   help="share of the pruned channels to implant as a 1x1 conv instead of removing (default: 0)")
    p.add_argument("--implant-init", choices=["zero", "fit"], default="zero",
                   help="how implants start: zero (HAP, default) or fit = least-squares stand-in for the replaced "
                   "filters, fitted on the scoring images")
    p.add_argument("--normalize", choices=["mean", "none"], default="mean",
                   help="scale each group's scores before the global ranking: mean = divide by the group's mean "
                   "(default), none = raw (comparable across layers only if the criterion makes them so)")
    p.add_argument("--shrink", action="store_true",
                   help="hap: shrink each channel's trace estimate toward its layer's mean by its standard error "
                   "before ranking (default: raw estimates, measured more accurate here)")
    p.add_argument("--latency-aware", action="store_true",
                   help="time every resized layer on this machine first and prefer cutting channels that cost "
                   "more time per MAC (same MAC budget, more speed)")
    p.add_argument("--round-to", type=round_to_arg, default=None, metavar="N|auto",
                   help="keep pruned channel counts multiples of N; auto = this CPU's float32 vector width "
                   "(16 with AVX-512, 8 with AVX2), where a CPU conv is fastest per MAC")
    p.add_argument("--keep-unprunable", action="store_true",
                   help="keep (do not prune) channels that pass through layers leanconv cannot resize, such as a "
                   "channel shuffle, instead of stopping with an error")
    p.add_argument("--steps", type=positive_int, default=1, metavar="K",
                   help="prune in K rounds with fine-tuning between them (default: 1)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="N", help="fine-tuning epochs (default: 0)")
    p.add_argument("--finetune-lr", type=positive_float, default=0.01, help="fine-tuning learning rate (default: 0.01)")
    p.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="fine-tune on N training images only (quick runs; default: all)")
    p.add_argument("--score-images", type=positive_int, default=512, help="validation images for scoring (default: 512)")
    p.add_argument("--probes", type=positive_int, default=64, help="cap on Hutchinson probes for hap (default: 64)")
    add_seed_arg(p)
    add_repeats_arg(p)
    add_data_args(p, default=None)
    add_output_args(p)
    p.set_defaults(func=run)


def round_to_arg(text: str) -> int | str:
    """``--round-to``: a positive whole number or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'auto', got {text!r}") from None


def resolve_round_to(value: int | str | None) -> int | None:
    """``--round-to`` as a number: ``auto`` becomes this CPU's float32 vector width."""
    return simd_channels() if value == "auto" else (int(value) if value else None)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    if args.finetune_epochs < 0:
        raise LeanconvError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    kind, target = ("macs", args.target_flops) if args.target_flops is not None else ("params", args.target_params)
    return PruneConfig(method=args.method, target=target, kind=kind, implant=args.implant,
                       implant_init=args.implant_init,
                       round_to=resolve_round_to(args.round_to),
                       steps=args.steps, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                       batch_size=args.batch_size, score_images=args.score_images, probes=args.probes,
                       seed=args.seed, latency_repeats=args.repeats, normalize=args.normalize,
                       latency_aware=args.latency_aware, shrink=args.shrink, strict=not args.keep_unprunable,
                       train_subset=args.train_subset)


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
    model = load_model(args.ckpt, constructor=args.constructor)
    data = data_from_meta(model, args)
    shape = input_shape_of(model)
    update, close = progress_bar(f"prune {args.method}", enabled=not args.no_progress)
    stage = (lambda text: None) if args.no_progress else (lambda text: print(f"leanconv: {text}", file=sys.stderr, flush=True))
    try:
        record = run_pruning(model, data, shape, config, resolution=resolution_of(model, data), progress=update,
                             stage=stage)
    finally:
        close()
    out = Path(args.out)
    record["source"] = str(args.ckpt)
    model.leanconv_meta = {**model.leanconv_meta, "prune": {k: record[k] for k in ("method", "config", "achieved")},
                           "test": {"accuracy": record["after"]["test_accuracy"]}}
    title = f"{args.method}: output channels per layer (target {config.target:g} of {config.kind})"
    write_together(out, {"model.safetensors": lambda p: checkpoint.save(model, p, constructor=args.constructor),
                         "record.json": lambda p: write_json(p, record),
                         "channels.png": lambda p: channels_chart(record["layers"], p, title=title)})
    _hint_alignment(record["layers"], config.round_to)
    _hint_no_implant(record, config)
    b, a = record["before"], record["after"]
    print(json.dumps({"method": args.method, "macs": [b["macs"], a["macs"]], "params": [b["params"], a["params"]],
                      "accuracy": [round(b["test_accuracy"], 2), round(a["test_accuracy"], 2)],
                      "mac_reduction": round(record["mac_reduction"], 3),
                      "speedup_batch64": round(record["speedup_batch64"], 3),
                      "speedup_batch64_bn_folded": round(record["speedup_batch64_bn_folded"], 3), "out": str(out)}))
    return 0
