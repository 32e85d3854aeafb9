"""``leanconv demo``: the main job on the embedded default (Fashion-MNIST, ResNet-20).

Train (or reuse) a ResNet-20 baseline on Fashion-MNIST, compress it every way leanconv knows
with the same fine-tuning budget, and write DIR/report.html and DIR/report.md. The width
methods are solved for half the baseline's latency measured on ONNX Runtime at batch 1, one
thread (--runtime, --batch; --target-flops 0.5 compares at half the MACs instead); every model
is timed side by side with the baseline. --quick uses tiny budgets (a few minutes) and says so
in the report.

The baseline is kept in ``DIR/baseline`` (a second run reuses it); the comparison is
:func:`leanconv.runs.compare.run_compare` with the plan's budgets.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cli.common import batch_size_arg, check_out_folder, progress_bar
from leanconv.cli.compare import compare_and_report
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError, UnreachableLatency
from leanconv.models import create
from leanconv.cost.runtimes import DEFAULT_RUNTIME, RUNTIMES
from leanconv.runs.compare import DEFAULT_METHODS, CompareConfig
from leanconv.runs.latency import LatencyBudget
from leanconv.runs.results import RESULTS_FILE, read_results
from leanconv.width.latency_budget import check_latency_reachable
from leanconv.runs.source import Source
from leanconv.train import TrainConfig, evaluate, fit

__all__ = ["HELP", "add_arguments", "run", "DemoPlan", "PLANS"]


@dataclass(frozen=True)
class DemoPlan:
    """The budgets of one demo flavour."""

    base_epochs: int
    base_subset: int | None  # training images for the baseline (None: all 55,000)
    finetune_epochs: int
    train_subset: int | None  # training images per fine-tuning epoch
    probes: int
    score_images: int
    samples: int  # 3-D pruning samples
    latency_repeats: int
    reconstruct_images: int  # training images the refit after each cut reads


PLANS = {
    "default": DemoPlan(base_epochs=4, base_subset=None, finetune_epochs=1, train_subset=None, probes=16,
                        score_images=256, samples=6, latency_repeats=10,
                        reconstruct_images=512),
    "quick": DemoPlan(base_epochs=1, base_subset=4000, finetune_epochs=1, train_subset=1000, probes=8,
                      score_images=128, samples=4, latency_repeats=3,
                      reconstruct_images=128),
}


LATENCY_METHODS = tuple(m for m in DEFAULT_METHODS if m != "hap+implant")  # implants are pruned to MACs
LATENCY_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the demo's latency budget: the first in reach here

HELP = "the main job: train ResNet-20 on Fashion-MNIST, compare every method, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a few minutes, figures not representative")
    p.add_argument("--data", default="fashion-mnist", help="dataset (default: fashion-mnist, the embedded default)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the system copy)")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                   help=f"where latency is budgeted and measured (default: {DEFAULT_RUNTIME})")
    p.add_argument("--batch", type=batch_size_arg, default=1, metavar="B",
                   help="batch size of the latency budget (default 1)")
    p.add_argument("--target-flops", action="store_true",
                   help="compare at half the MACs (the counted budget) instead of half the measured latency")
    p.add_argument("--no-progress", action="store_true")


def _check_reuse(out: Path, plan: DemoPlan, data) -> bool:
    """True when ``out`` holds a finished baseline of this plan and data (reused); raises, before
    any work, when it holds a demo made otherwise (its comparison could not be resumed)."""
    path = out / "baseline" / "model.safetensors"
    if not path.exists():
        return False
    meta = checkpoint.read_header(path)["meta"]
    if "demo_plan" not in meta and (meta.get("dataset") or {}).get("name") in (None, data.name):
        return False  # a baseline whose training was interrupted: training resumes it (fit checks its settings)
    made = (meta.get("demo_plan"), (meta.get("dataset") or {}).get("name"))
    if made != ({"epochs": plan.base_epochs, "subset": plan.base_subset}, data.name):
        raise LeanconvError(f"{out} holds a demo made with other settings (baseline {made[0]} on {made[1]}); "
                            "use another --out, or delete that folder to start over")
    return True


def _baseline(out: Path, plan: DemoPlan, data, show: bool) -> Path:
    """Train the baseline into ``out/baseline`` unless a finished one with the same plan is there."""
    path = out / "baseline" / "model.safetensors"
    wanted = {"epochs": plan.base_epochs, "subset": plan.base_subset}
    if _check_reuse(out, plan, data):
        return path
    torch.manual_seed(0)  # the initial weights too: a demo repeats to the bit
    model = create("resnet20", num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.image_size)
    model.leanconv_meta = {**model.leanconv_meta, "dataset": {"name": data.name, "data_dir": None}}
    subset = None if plan.base_subset is None else min(plan.base_subset, len(data.train))
    train = data.loader("train", 128, shuffle=True, augment=True, drop_last=True, subset=subset)
    update, close = progress_bar("train baseline", enabled=show)
    try:
        fit(model, train, TrainConfig(epochs=plan.base_epochs), val_loader=data.loader("val", 256),
            out_dir=out / "baseline", resume=True, progress=update)
    finally:
        close()
    model.leanconv_meta["test"] = {"accuracy": evaluate(model, data.loader("test", 256))["accuracy"]}
    model.leanconv_meta["demo_plan"] = wanted
    checkpoint.save(model, path)
    return path


def _resumed_kind(out: Path) -> str | None:
    """The budget of the comparison a demo folder holds (``latency`` or ``macs``; None: none yet),
    so that a demo that fell back to MACs resumes as such."""
    results = out / RESULTS_FILE
    run = read_results(results, require_baseline=False)["run"] if results.exists() else None
    return None if run is None else run["identity"].get("budget", "macs")


def _latency_target(out: Path, source: Source, runtime: str, batch: int, show: bool) -> float:
    """Half the baseline's latency, or where that is out of reach on this machine (the fastest
    model the channel staircase allows is predicted slower), the first of 0.6, 0.7, ... that
    is in reach, said on stderr. A demo folder that holds latency entries keeps their target,
    so a re-run resumes instead of starting a new budget."""
    results = out / RESULTS_FILE
    if results.exists():
        done = [e for e in read_results(results, require_baseline=False)["entries"] if e.get("budget") == "latency"]
        if done:
            return float(done[0]["target"])
    model, shape = source.fresh(), source.shape
    budget = LatencyBudget(runtime, 1, batch)
    fastest = check_latency_reachable(model, torch.zeros(1, *shape), target=1.0 - 1e-9,
                                      latency=budget.check(model, torch.zeros(1, *shape), shape, 1.0 - 1e-9),
                                      input_shape=shape)
    for target in LATENCY_TARGETS:
        if fastest <= target - 0.05:
            break
    if target != 0.5 and show:
        print(f"leanconv demo: half the latency is out of reach on {runtime} here (the fastest model the channel "
              f"staircase allows is predicted at {fastest:.2f}); the demo budgets {target:g} of it", file=sys.stderr)
    return target


def _compare_config(args: argparse.Namespace, plan: DemoPlan, out: Path, kind: str,
                    target: float) -> tuple[CompareConfig, str]:
    """The comparison the demo runs at ``target`` of the ``kind`` (``latency`` or ``macs``), and
    the demo command that repeats it."""
    budget = {} if kind == "macs" else {"budget": "latency", "methods": LATENCY_METHODS}
    config = CompareConfig(targets=(target,), **budget, runtime=args.runtime, latency_batch=args.batch,
                           finetune_epochs=plan.finetune_epochs, train_subset=plan.train_subset,
                           probes=plan.probes, score_images=plan.score_images, samples=plan.samples,
                           reconstruct_images=plan.reconstruct_images,
                           latency_repeats=plan.latency_repeats, quick=args.quick,
                           onnx_opset=17 if args.quick else None)  # quick: the TorchScript exporter, ~20x faster
    command = shlex.join(["leanconv", "demo", "--out", str(out), "--data", args.data, "--runtime", args.runtime,
                          "--batch", str(args.batch), *(["--target-flops"] if kind == "macs" else []),
                          *(["--quick"] if args.quick else [])])
    return config, command


def run(args: argparse.Namespace) -> int:
    plan = PLANS["quick" if args.quick else "default"]
    out = Path(args.out if args.out is not None else ("runs/demo-quick" if args.quick else "runs/demo"))
    check_out_folder(args.out if args.out is not None else out)  # an empty --out is refused, not the current folder
    data = load_dataset(args.data, args.data_dir)
    _check_reuse(out, plan, data)
    show = not args.no_progress
    if show:
        print(f"leanconv demo: baseline ResNet-20 on {data.name} ({plan.base_epochs} epochs) in {out}/baseline",
              file=sys.stderr)
    ckpt = _baseline(out, plan, data, show)
    source = Source.from_checkpoint(ckpt, data=args.data, data_dir=args.data_dir)
    options = [("macs", 0.5)]  # a latency target out of reach here falls back to the next milder, then to MACs
    if not args.target_flops and _resumed_kind(out) != "macs":
        first = _latency_target(out, source, args.runtime, args.batch, show)
        options = [("latency", t) for t in LATENCY_TARGETS if t >= first] + options
    for i, (kind, target) in enumerate(options):
        config, command = _compare_config(args, plan, out, kind, target)
        try:
            paths = compare_and_report(source, config, out, show_progress=show, command=command)
            break
        except UnreachableLatency as exc:  # the unpruned model timed again, slower or faster: nothing written yet
            if i + 1 == len(options) or (out / RESULTS_FILE).exists():  # the last option, or a folder in use
                raise
            if show:
                print(f"leanconv demo: {exc}; the demo budgets {options[i + 1][1]:g} of the "
                      f"{'latency' if options[i + 1][0] == 'latency' else 'MACs'} instead", file=sys.stderr)
    print(json.dumps({"report": str(paths["html"]), "markdown": str(paths["markdown"]), "baseline": str(ckpt),
                      "budget": f"{config.budget} {target:g}" + (f" on {args.runtime}, batch {args.batch}"
                                                           if config.budget == "latency" else "")}))
    return 0
