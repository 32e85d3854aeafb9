r"""Pricing a latency budget's cuts: the frontier shortcut and capped counts against the old way.

A latency budget prices each allowed cut of each channel group by the validation loss after it
(BatchNorm re-estimated) minus the unpruned model's (``leanconv.width.damage``). This benchmark
prices one checkpoint's cuts (l1 ranks the channels; the first ``--images`` validation images)
in these ways, one after the other, alone on the machine:

- ``whole-all``: every allowed count, each cut model run whole (the code before the shortcut);
- ``frontier-all``: every allowed count, each cut run from its group's frontier;
- ``frontier-C`` for each C of ``--counts``: at most C counts per group, the rest interpolated.

For each it prints the seconds, the cuts measured and the largest difference to ``whole-all``
over every (group, count). Then, for each latency target R (``--targets``; ONNX Runtime,
1 thread, batch 1, the table calibrated on the unpruned model timed once), it solves the
greedy plan from each pricing and gives the plan's predicted latency ratio, its MACs and its
accuracy right after the cut (BatchNorm re-estimated on training images; test set), so that a
cheaper pricing's effect on the choice shows. One JSON file (``--out``) holds it all.

    .venv/bin/python benchmarks/bench_damage.py benchmarks/results/r56_fm3/model.safetensors \
        --out benchmarks/results/bench_damage_r56.json
    # a smoke test (64 images, 2,000 test images), never into results/:
    .venv/bin/python benchmarks/bench_damage.py benchmarks/results/r20_fm10/model.safetensors --images 64 \
        --test-images 2000 --counts 3 --out /tmp/bench_damage_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from leanconv.cost import count
from leanconv.cost.hardware import cpu_name
from leanconv.importance import ScoringData, run_criterion
from leanconv.runs.latency import LatencyBudget
from leanconv.runs.source import Source
from leanconv.train import evaluate, recalibrate_on_training_data
from leanconv.width import damage
from leanconv.width.latency_budget import LatencyPruner


def pricing(name: str, source: Source, data: ScoringData, latency, counts: int | None, whole: bool):
    """A LatencyPruner priced one way, and the seconds its pricing took."""
    model = source.fresh().eval()
    trace = damage._Graph.trace
    if whole:
        damage._Graph.trace = classmethod(lambda cls, *args: None)
    t0 = time.perf_counter()
    try:
        pruner = LatencyPruner(model, run_criterion("l1", probes=1, seed=0), torch.zeros(1, *source.shape),
                               latency=latency, input_shape=source.shape, data=data, price="damage", counts=counts)
    finally:
        damage._Graph.trace = trace
    seconds = time.perf_counter() - t0
    cuts = sum(len(damage.priced_counts(o, counts)) for o in pruner.solver.options)
    print(f"{name:>14}: {seconds:7.1f} s, {cuts} cuts measured", flush=True)
    return pruner, seconds, cuts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--images", type=int, default=512, help="validation images the cuts are priced on")
    parser.add_argument("--counts", type=int, nargs="+", default=[6, 3])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.33])
    parser.add_argument("--test-images", type=int, default=None, help="judge on this many test images (all)")
    parser.add_argument("--no-whole", action="store_true", help="skip whole-all (the slow old way)")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    source = Source.from_checkpoint(args.ckpt)
    data = ScoringData(source.data.scoring_batches(args.images, 128, source.resolution))
    budget = LatencyBudget("onnxruntime", 1, 1)
    base = source.fresh().eval()
    latency = budget.check(base, torch.zeros(1, *source.shape), source.shape, min(args.targets))
    ways = ([] if args.no_whole else [("whole-all", None, True)]) + [("frontier-all", None, False)]
    ways += [(f"frontier-{c}", c, False) for c in args.counts]
    priced = {name: pricing(name, source, data, latency, counts, whole) for name, counts, whole in ways}
    reference = next(iter(priced.values()))[0]
    ref_damage = {key: reference._lost(key[0], reference.solver.options[key[0]][0], key[1])
                  for key in ((g, k) for g, o in enumerate(reference.solver.options) for k in o[1:])}
    test = source.data.loader("test", 256, resolution=source.resolution, subset=args.test_images)
    macs0 = count(base, source.shape).macs
    rows = []
    for name, (pruner, seconds, cuts) in priced.items():
        diff = max(abs(pruner._lost(g, pruner.solver.options[g][0], k) - v) for (g, k), v in ref_damage.items())
        row = {"pricing": name, "seconds": seconds, "cuts_measured": cuts, "max_abs_diff_to_first": diff,
               "plans": []}
        for target in args.targets:
            plan = pruner.solve(target)
            model, result = pruner.realise(plan, target)
            recalibrate_on_training_data(model, source.data, source.resolution)
            row["plans"].append({"target": target, "kept": plan.kept, "predicted": result.achieved,
                                 "macs_ratio": count(model, source.shape).macs / macs0,
                                 "one_shot_accuracy": evaluate(model, test)["accuracy"]})
        rows.append(row)
        plans = "  ".join(f"R {p['target']}: pred {p['predicted']:.3f}, MACs {p['macs_ratio']:.3f}, "
                          f"one-shot {p['one_shot_accuracy']:.2f}" for p in row["plans"])
        print(f"{name:>14}: diff {diff:.2e}  {plans}", flush=True)
    out = {"ckpt": args.ckpt, "images": args.images, "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "load_average_at_start": load, "reference": rows[0]["pricing"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
