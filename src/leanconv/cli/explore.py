"""``leanconv explore``: train and measure a grid of SCC / pSConv variants of one zoo model.

Design-space exploration (DSXplore): build each variant of a zoo model (DW + sliding-channel
convs for every --scc-groups x --scc-overlap pair, periodic sparse convs for every
--psconv-patterns entry, optionally the dense model), train each from scratch for the same budget,
and record test accuracy, params, MACs and measured latency; then time every variant side by
side with the dense model (interleaved rounds) on each --runtimes entry at batch 1 and 64:
the speedups the table reports. Resumable: finished variants in DIR/results.jsonl are never
redone.

Writes DIR/results.jsonl (one line per finished variant), DIR/variants/, DIR/explore.json,
DIR/table.md and DIR/pareto.png (test accuracy vs counted MACs with the Pareto front). See
:mod:`leanconv.convs.explore`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from leanconv.cli.common import (add_data_args, add_output_args, add_repeats_arg, add_seed_arg, epochs_arg, list_of,
                                 number_in, positive_float, positive_int, progress_bar, threads_arg, whole_in)
from leanconv.data import load_dataset
from leanconv.convs.explore import PAPER_OVERLAPS, ExploreConfig, run_explore, time_variants, write_summary
from leanconv.models import names
from leanconv.models.registry import resolve_constructor
from leanconv.report.plots import tradeoff_chart
from leanconv.util.limits import MAX_GROUPS
from leanconv.train import TrainConfig

__all__ = ["HELP", "add_arguments", "run", "config_from_args"]


HELP = "train a grid of SCC / pSConv variants of a model; Pareto table and plot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20", metavar="NAME|PKG.MODULE:FN",
                   help=f"a zoo model ({', '.join(names())}) or your own constructor (default: resnet20)")
    add_data_args(p)
    p.add_argument("--scc-groups", type=list_of(whole_in(1, MAX_GROUPS)), default=(), metavar="G,G,...",
                   help="SCC channel groups to try, e.g. 1,2,4,8 (default: none)")
    p.add_argument("--scc-overlap", type=list_of(number_in(at_least=0, below=1)), default=PAPER_OVERLAPS,
                   metavar="O,O,...",
                   help="SCC overlaps to try with every group count (default: 0.25,0.33,0.5,0.75)")
    p.add_argument("--psconv-patterns", type=list_of(str), default=(), metavar="P,P,...",
                   help="pSConv patterns to try, e.g. psd4_p8,psd2_p8,psd1_p16,ps4_p4 (default: none)")
    p.add_argument("--include-dense", action="store_true", help="also train the unconverted model")
    p.add_argument("--epochs", type=epochs_arg, default=3, help="training epochs per variant (default: 3)")
    p.add_argument("--train-subset", "--subset", dest="subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate (default: 0.1)")
    add_seed_arg(p)
    p.add_argument("--threads", type=threads_arg, default=None, help="CPU threads (default: PyTorch's)")
    add_repeats_arg(p)
    p.add_argument("--runtimes", type=list_of(str), default=("torch", "onnxruntime"), metavar="R,R,...",
                   help="runtimes every variant is timed on, side by side with the dense model: torch, onnxruntime, "
                   "openvino (default: torch,onnxruntime)")
    p.add_argument("--rounds", type=whole_in(1, 100), default=5,
                   help="interleaved timing rounds per runtime and batch (default: 5)")
    add_output_args(p, out_help="output folder (re-use it to resume)")


def config_from_args(args: argparse.Namespace) -> ExploreConfig:
    train = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, threads=args.threads)
    return ExploreConfig(model=args.model, dataset=args.data, data_dir=args.data_dir, scc_groups=args.scc_groups,
                         scc_overlaps=args.scc_overlap, psconv_patterns=args.psconv_patterns,
                         include_dense=args.include_dense, train=train, batch_size=args.batch_size,
                         subset=args.subset, latency_repeats=args.repeats, runtimes=tuple(args.runtimes),
                         timing_rounds=args.rounds)


def _variant_bars(enabled: bool) -> tuple[Callable[[int, int, dict], None], Callable[[], None]]:
    """A progress callback that opens one bar per variant."""
    state: dict = {"variant": None, "update": None, "close": lambda: None}

    def update(done: int, total: int, info: dict) -> None:
        if info.get("variant") != state["variant"]:
            state["close"]()
            label = f"[{info.get('index')}/{info.get('variants')}] {info.get('variant')}"
            state["update"], state["close"] = progress_bar(label, enabled=enabled)
            state["variant"] = info.get("variant")
        state["update"](done, total, {k: v for k, v in info.items() if k not in ("variant", "index", "variants")})

    return update, lambda: state["close"]()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    load_dataset(config.dataset, config.data_dir)  # a bad --data or --data-dir: refused before any work (then cached)
    if config.model not in names():
        resolve_constructor(config.model)  # PKG.MODULE:FN that cannot be imported: refused before any work
    out = Path(args.out)
    update, close = _variant_bars(not args.no_progress)
    try:
        records = run_explore(config, out, progress=update)
    finally:
        close()
    tick, done = progress_bar("timing side by side with dense", enabled=not args.no_progress)
    try:
        speed = time_variants(config, out, records, progress=tick)
    finally:
        done()
    summary = write_summary(out, config, speed)
    records = summary["records"]
    by_name = len(records) <= 10  # one colour per variant while tab10 has enough, else per kind
    points = [{"label": r["variant"] if by_name else r["kind"], "macs": r["macs"] / 1e6,
               "accuracy": r["test_accuracy"]} for r in records]
    tradeoff_chart(points, out / "pareto.png", x="macs", xlabel="MACs per image (M, counted)",
                   title=f"{config.model} on {config.dataset}: accuracy vs MACs ({config.train.epochs} epochs)")
    print((out / "table.md").read_text(), end="")
    print(f"speedup: the dense model's time over the variant's, timed side by side in {config.timing_rounds} "
          f"interleaved rounds of {config.latency_repeats} on {', '.join(config.runtimes)} "
          f"({config.train.threads or 1} thread(s); each setting in explore.json)")
    print(f"wrote {out / 'results.jsonl'}, {out / 'explore.json'}, {out / 'table.md'}, {out / 'pareto.png'}")
    return 0
