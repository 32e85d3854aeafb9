"""Whole converted models against their dense originals, side by side, per runtime and batch.

For each model and conversion: the dense model, the model with every layer the placement
rules pick converted (``all``), and the model converted as ``leanconv convert --where auto``
does it (``auto``: the layers measured faster alone on that runtime and batch, each in its
fastest form, confirmed on the whole model; :mod:`leanconv.convs.placement`), timed in
interleaved rounds on one runtime at one batch (``time_side_by_side``; 1 thread unless
``--threads``). Speed does not depend on the weights, so the models are freshly initialised
zoo models; the accuracy of converted models is ``bench_convert_accuracy.py``'s.

    .venv/bin/python benchmarks/bench_convert_speed.py --out benchmarks/results/convert_speed.json
    .venv/bin/python benchmarks/bench_convert_speed.py --models resnet20 --runtimes torch --batches 1 \
        --rounds 2 --repeats 2 --out /tmp/smoke.json                  # a smoke run

Prints one table row per (model, conversion, runtime, batch): the speedup over dense (median
over rounds, with the slowest and fastest round) of ``all`` and ``auto``, and how many layers
``auto`` converted. Results are appended to the JSON file as they come (a rerun skips rows
already there).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from leanconv.convs.convert import conversion_spec, convert, replacements
from leanconv.convs.placement import choose, confirm, measure_layers, set_forms
from leanconv.cost import count
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.models import create

# model -> (input shape, conversions); the CIFAR-sized models at 32x32, ResNet-20 as on Fashion-MNIST
MODELS = {
    "resnet20": ((1, 28, 28), ("psconv:psd4_p8", "scc:2", "scc:4")),
    "vgg16": ((3, 32, 32), ("psconv:psd4_p8", "scc:4")),
    "resnet18": ((3, 32, 32), ("psconv:psd4_p8", "scc:4")),
    "mobilenetv2": ((3, 32, 32), ("scc:2", "scc:4")),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the whole models (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per model and round (default 5)")
    p.add_argument("--margin", type=float, default=0.05, help="auto: converted when <= 1 - margin of dense")
    p.add_argument("--out", default="benchmarks/results/convert_speed.json")
    return p.parse_args()


def build(name: str, shape: tuple[int, int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return create(name, in_channels=shape[0], input_size=shape[1], num_classes=10).eval()


def converted(model: torch.nn.Module, conversion: str, layers=None) -> torch.nn.Module:
    to, arg = conversion.split(":")
    kwargs = {"pattern": arg} if to == "psconv" else {"groups": int(arg)}
    return convert(copy.deepcopy(model), to, layers=layers, **kwargs).eval()


def spec_of(conversion: str):
    to, arg = conversion.split(":")
    return conversion_spec(to, pattern=arg) if to == "psconv" else conversion_spec(to, groups=int(arg))


def row(name: str, shape, conversion: str, runtime: str, batch: int, a: argparse.Namespace) -> dict:
    dense = build(name, shape)
    timings = measure_layers(dense, replacements(dense, spec_of(conversion)), shape, runtime=runtime,
                             threads=a.threads, batch=batch, rounds=3, repeats=3)
    chosen = choose(timings, a.margin)
    checks = []
    if chosen:
        chosen, checks = confirm(dense, spec_of(conversion), timings, chosen, shape, runtime=runtime,
                                 threads=a.threads, batch=batch, margin=a.margin, rounds=3, repeats=3)
    models = {"dense": dense, "all": converted(dense, conversion)}
    if chosen:
        models["auto"] = converted(dense, conversion, chosen)
        set_forms(models["auto"], [t for t in timings if t.path in chosen])
    side = time_side_by_side(models, shape, runtime=runtime, threads=a.threads, batch=batch, rounds=a.rounds,
                             repeats=a.repeats, warmup=3)
    macs = {k: count(m, shape).macs for k, m in models.items()}
    return {"model": name, "input_shape": list(shape), "conversion": conversion, "runtime": runtime, "batch": batch,
            "threads": a.threads, "setting": side.setting(), "speedup": side.speedup, "latency_ms": side.latency_ms,
            "macs": macs, "auto_layers": chosen, "candidates": len(timings), "whole_model_checks": checks,
            "auto_forms": {t.path: t.form for t in timings if t.path in chosen},
            "layer_ratios": {t.path: t.ratio["median"] for t in timings}}


def line(r: dict) -> str:
    def cell(key: str) -> str:
        s = r["speedup"].get(key)
        return f"{s['median']:.2f}x ({s['low']:.2f}-{s['high']:.2f})" if s else "none faster"
    macs = r["macs"]["all"] / r["macs"]["dense"]
    return (f"| {r['model']} | {r['conversion']} | {r['runtime']} | {r['batch']} | {cell('all')} | {macs:.2f} | "
            f"{cell('auto')} | {len(r['auto_layers'])}/{r['candidates']} |")


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    rows = [json.loads(t) for t in out.read_text().splitlines() if t.strip()] if out.exists() else []
    done = {(r["model"], r["conversion"], r["runtime"], r["batch"], r["threads"]) for r in rows}
    print("| model | conversion | runtime | batch | all: speedup | all: MACs | auto: speedup | auto layers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(line(r))
    for name in a.models:
        shape, conversions = MODELS[name]
        for conversion in conversions:
            for runtime in a.runtimes:
                for batch in a.batches:
                    if (name, conversion, runtime, batch, a.threads) in done:
                        continue
                    r = row(name, shape, conversion, runtime, batch, a)
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(line(r), flush=True)


if __name__ == "__main__":
    main()
