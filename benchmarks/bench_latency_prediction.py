"""How well the latency table predicts whole zoo models, pruned and unpruned, and what it costs.

For each zoo model (freshly initialised: speed does not depend on the weights), runtime and
batch (1 thread), on a private latency cache that starts empty:

1. ``LatencyBudget.check`` times the unpruned model, builds the table entries its layers and
   every channel count the solver may choose need, and calibrates the latency model: its
   seconds are the **table build** time (the issue's <= 60 s on ResNet-56).
2. Variants: l1 to 50% of the MACs (unaligned), 50% with ``round_to`` = this CPU's channel
   block, 33% unaligned, and the latency solver's own plan for 0.5 of the latency (l1 scores
   as prices, no data: its seconds are the **solve** time, the issue's <= 10 s).
3. Each variant is predicted by the calibrated table and timed side by side with the unpruned
   model in interleaved rounds; the **prediction error** is predicted / measured - 1.

    .venv/bin/python benchmarks/bench_latency_prediction.py --out benchmarks/results/latency_prediction.jsonl
    .venv/bin/python benchmarks/bench_latency_prediction.py --models resnet20 --runtimes onnxruntime \
        --batches 1 --rounds 3 --out /tmp/smoke.jsonl                  # a smoke run

Rows (one per model, runtime, batch, variant) append to the JSON-lines file as they finish; a
rerun skips those there. Prints a table. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from leanconv.cost import count, simd_channels
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.importance import run_criterion
from leanconv.models import create
from leanconv.runs.latency import LatencyBudget
from leanconv.width.budget import prune_to_budget
from leanconv.width.latency_budget import LatencyPruner

MODELS = {"resnet20": (1, 28, 28), "resnet56": (1, 28, 28), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32),
          "mobilenetv2": (3, 32, 32)}
VARIANTS = ("macs0.5", "macs0.5-aligned", "macs0.33", "latency0.5")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side-by-side timing (default 5)")
    p.add_argument("--out", default="benchmarks/results/latency_prediction.jsonl")
    return p.parse_args()


def variant(name: str, base: torch.nn.Module, shape, latency) -> tuple[torch.nn.Module, float, float]:
    """The pruned model, its predicted latency ratio, and the seconds the pruning took."""
    model, example = copy.deepcopy(base), torch.randn(1, *shape)
    t0 = time.perf_counter()
    if name.startswith("latency"):
        pruner = LatencyPruner(model, run_criterion("l1", probes=1), example, latency=latency, input_shape=shape)
        plan = pruner.solve(float(name[len("latency"):]))
        model, _ = pruner.realise(plan, float(name[len("latency"):]))
    else:
        target = float(name[len("macs"):].split("-")[0])
        prune_to_budget(model, run_criterion("l1", probes=1), example, target=target, kind="macs", input_shape=shape,
                        round_to=simd_channels() if name.endswith("aligned") else None)
    seconds = time.perf_counter() - t0
    return model, latency.predict(model) / latency.predict(base), seconds


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["model"], r["runtime"], r["batch"], r["variant"]) for r in rows}
    cache = tempfile.mkdtemp(prefix="leanconv-latency-")
    os.environ["XDG_CACHE_HOME"] = cache  # every table starts empty: its build time is the first check's
    for name in a.models:
        shape = MODELS[name]
        torch.manual_seed(0)
        base = create(name, in_channels=shape[0], input_size=shape[1], num_classes=10).eval()
        for runtime in a.runtimes:
            for batch in a.batches:
                todo = [v for v in a.variants if (name, runtime, batch, v) not in done]
                if not todo:
                    continue
                budget = LatencyBudget(runtime, 1, batch)
                t0 = time.perf_counter()
                latency = budget.check(base, torch.randn(1, *shape), shape, target=0.95, strict=False)
                build = time.perf_counter() - t0
                for v in todo:
                    pruned, predicted, seconds = variant(v, base, shape, latency)
                    sbs = time_side_by_side({"unpruned": base, "pruned": pruned}, shape, runtime=runtime, threads=1,
                                            batch=batch, rounds=a.rounds, repeats=10, warmup=3, warmup_s=0.5)
                    measured = sbs.ratio["pruned"]
                    row = {"model": name, "runtime": runtime, "batch": batch, "variant": v,
                           "predicted": predicted, "measured": measured,
                           "error": predicted / measured["median"] - 1,
                           "macs": count(pruned, shape).macs / count(base, shape).macs,
                           "table_build_seconds": build, "table_entries": len(latency.table.entries),
                           "prune_seconds": seconds, "version": sbs.version, "cpu": sbs.cpu}
                    rows.append(row)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{name} {runtime} b{batch} {v}: predicted {predicted:.3f}, measured {measured['median']:.3f} "
                          f"({measured['low']:.3f}-{measured['high']:.3f}), error {100 * row['error']:+.1f}%, "
                          f"table {build:.1f} s, prune {seconds:.1f} s", flush=True)
    print("\n| model | runtime | batch | variant | MACs | predicted | measured (spread) | error | table s | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["measured"]
        print(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['variant']} | {r['macs']:.2f} | "
              f"{r['predicted']:.3f} | {m['median']:.3f} ({m['low']:.3f}-{m['high']:.3f}) | "
              f"{100 * r['error']:+.1f}% | {r['table_build_seconds']:.1f} | {r['prune_seconds']:.1f} |")


if __name__ == "__main__":
    main()
