"""How well the calibrated latency model predicts many different cuts of one trained model.

``bench_latency_prediction.py`` checks four cuts per zoo model; a latency budget's solver,
though, visits allocations far from uniform (one stage cut to its floor, another kept whole).
Here one checkpoint is calibrated as ``leanconv prune --target-latency`` calibrates it
(:meth:`~leanconv.runs.latency.LatencyBudget.check`), then cut many ways on the staircase:

* ``uniformF``: every group at the staircase count nearest F of its width (F = 0.75, 0.5,
  0.375, 0.25);
* ``early_low`` / ``late_low``: the first / last third of the groups at their lowest count,
  the rest whole;
* ``randomI``: every group at a random staircase count (seeded);
* ``solveR``: the solver's own plan for R of the latency (l1 scores), where reachable;
* ``macs0.5`` / ``macs0.5-aligned``: l1 to half the MACs, unaligned and on the CPU's block.

All of them and the unpruned model are timed side by side in interleaved rounds (one
session per runtime and batch); each row gives the predicted and the measured ratio to the
unpruned model. On eager PyTorch the row also gives what the offset-only calibration (one
reference, as before the thin reference existed) predicts from the same table, so the two
calibrations are compared on the same timings.

    .venv/bin/python benchmarks/bench_latency_variants.py benchmarks/results/r20_fm10/model.safetensors \\
        --out benchmarks/results/latency_variants_r20.jsonl

Timings are only meaningful on a quiet machine (1 thread per timing).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from leanconv.cost import count, simd_channels
from leanconv.cost.latency_table import LatencyModel
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.errors import LeanconvError
from leanconv.importance import run_criterion
from leanconv.runs.latency import LatencyBudget, describe
from leanconv.runs.source import Source
from leanconv.width.budget import prune_to_budget
from leanconv.width.latency_budget import LatencyPlan, LatencyPruner


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime", "torch"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--randoms", type=int, default=6, help="random allocations (default 6)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def allocations(pruner: LatencyPruner, randoms: int) -> dict[str, list[int]]:
    options = pruner.solver.options
    sizes = [o[0] for o in options]
    n, third = len(options), max(1, len(options) // 3)
    plans = {f"uniform{f}": [min(o, key=lambda k: (abs(k - f * s), -k)) for o, s in zip(options, sizes)]
             for f in (0.75, 0.5, 0.375, 0.25)}
    plans["early_low"] = [o[-1] if g < third else s for g, (o, s) in enumerate(zip(options, sizes))]
    plans["late_low"] = [o[-1] if g >= n - third else s for g, (o, s) in enumerate(zip(options, sizes))]
    draw = random.Random(0)
    plans.update({f"random{i}": [draw.choice(o) for o in options] for i in range(randoms)})
    for r in (0.5, 0.33):
        try:
            plans[f"solve{r}"] = pruner.solve(r).kept
        except LeanconvError:
            pass  # below what the staircase reaches on this runtime
    return plans


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    source = Source.from_checkpoint(a.ckpt)
    base, shape = source.fresh().eval(), source.shape
    example = torch.randn(1, *shape)
    out = Path(a.out)
    for runtime in a.runtimes:
        for batch in a.batches:
            t0 = time.perf_counter()
            latency = LatencyBudget(runtime, 1, batch).check(base, example, shape, target=0.999, strict=False)
            check_s = time.perf_counter() - t0
            alone = None
            if latency.eager:  # the calibration on the unpruned model alone, from the same table
                alone = LatencyModel.calibrate(latency.table, base, shape, latency.reference_ms, step=latency.step)
            pruner = LatencyPruner(base, run_criterion("l1", probes=1), example, latency=latency, input_shape=shape)
            models = {"unpruned": base}
            for name, kept in allocations(pruner, a.randoms).items():
                models[name] = pruner.realise(LatencyPlan(kept, 0.0), 0.5)[0]
            for name, aligned in (("macs0.5", None), ("macs0.5-aligned", simd_channels())):
                models[name] = copy.deepcopy(base)
                prune_to_budget(models[name], run_criterion("l1", probes=1), example, target=0.5, kind="macs",
                                input_shape=shape, round_to=aligned)
            timed = time_side_by_side(models, shape, runtime=runtime, threads=1, batch=batch, rounds=a.rounds,
                                      repeats=10, warmup=3, warmup_s=0.5)
            print(f"\n{runtime}, batch {batch} (check {check_s:.1f} s): {describe(latency)}")
            head = "| variant | MACs | measured (spread) | predicted (error) |"
            print(head + (" offset only (error) |" if alone else ""))
            errors, old = [], []
            for name, model in models.items():
                if name == "unpruned":
                    continue
                measured = timed.ratio[name]
                predicted = latency.predict(model) / latency.predict(base)
                row = {"ckpt": a.ckpt, "runtime": runtime, "batch": batch, "variant": name,
                       "macs": count(model, shape).macs / count(base, shape).macs, "measured": measured,
                       "predicted": predicted, "error": predicted / measured["median"] - 1,
                       "calibration": describe(latency), "version": timed.version, "cpu": timed.cpu}
                line = (f"| {name} | {row['macs']:.2f} | {measured['median']:.3f} ({measured['low']:.3f}-"
                        f"{measured['high']:.3f}) | {predicted:.3f} ({100 * row['error']:+.1f}%) |")
                if alone is not None:
                    row["offset_only"] = alone.predict(model) / alone.predict(base)
                    row["offset_only_error"] = row["offset_only"] / measured["median"] - 1
                    old.append(abs(row["offset_only_error"]))
                    line += f" {row['offset_only']:.3f} ({100 * row['offset_only_error']:+.1f}%) |"
                errors.append(abs(row["error"]))
                print(line)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            summary = f"largest error {100 * max(errors):.1f}%, mean {100 * sum(errors) / len(errors):.1f}%"
            if old:
                summary += f"; offset only: largest {100 * max(old):.1f}%, mean {100 * sum(old) / len(old):.1f}%"
            print(summary, flush=True)


if __name__ == "__main__":
    main()
