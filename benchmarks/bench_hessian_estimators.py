"""Per-channel curvature estimators against the exact Hessian block traces of a small trained CNN.

A four-layer ReLU CNN (about 3,700 weights) is trained briefly on Fashion-MNIST images pooled
to 14x14; the exact block trace ``Tr(H_pp)`` of every output channel is then computed with
one Hessian-vector product per weight (unit vectors, so no estimate enters). Each estimator
then runs at equal cost, counted in HVPs (the Gauss-Newton estimator costs per-image Jacobians
instead; its seconds are given):

- ``hutchinson``: plain Rademacher probes over all weights (the paper's);
- ``layer-split``: each probe split by layer (``probe_groups="layer"``): one HVP per layer
  per probe, no cross-layer noise;
- ``hutch++``: a third of the HVPs sketch a low-rank part taken exactly, the rest probe the
  residual;
- ``gauss-newton``: the exact Gauss-Newton blocks (equal to the Hessian's blocks for a
  piecewise-linear network like this one).

For each (estimator, HVP budget, seed): the median relative error over channels and the
Spearman rank correlation of HAP's sensitivity (trace form) with the exact one. Writes JSON.

    .venv/bin/python benchmarks/bench_hessian_estimators.py --out benchmarks/results/hessian_estimators.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from leanconv.data import load_dataset
from leanconv.importance.hessian import channel_traces, default_params
from leanconv.importance.hessian.hvp import hvp


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def images(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in split.loader("train", 256, subset=n).epoch(0):
        xs.append(nn.functional.avg_pool2d(x, 2))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def exact_block_traces(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """``Tr(H_pp)`` for every channel from one HVP per weight (unit vectors, 64 at a time)."""
    sel = {n: p.detach() for n, p in default_params(model).items()}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in sel}
    out = {}
    with torch.enable_grad():
        for name, w in sel.items():
            diag = torch.zeros(w.numel(), dtype=torch.float64)
            for a in range(0, w.numel(), 64):
                idx = torch.arange(a, min(a + 64, w.numel()))
                us = {n: torch.zeros(len(idx), *p.shape, dtype=p.dtype) for n, p in sel.items()}
                us[name].reshape(len(idx), -1)[torch.arange(len(idx)), idx] = 1
                hu = hvp(model, sel, fixed, batches, us, method="double_backward")
                diag[idx] = hu[name].reshape(len(idx), -1)[torch.arange(len(idx)), idx].double()
            out[name] = diag.reshape(w.shape[0], -1).sum(1)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def sensitivity(traces: dict, model: nn.Module) -> torch.Tensor:
    w = default_params(model)
    return torch.cat([t.double() / w[n][0].numel() * w[n].detach().reshape(w[n].shape[0], -1).double().pow(2).sum(1)
                      for n, t in traces.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="24,96,384", help="HVPs per estimate")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=512, help="images the Hessian is taken over")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    model = toy()
    x, y = images(data, 6000)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):  # a trained point: the curvature of a fitted model, not of its start
        for a in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[a:a + 128]), y[a:a + 128]).backward()
            opt.step()
    model.eval()
    xv, yv = x[-args.images:], y[-args.images:]
    batches = [(xv[a:a + 128], yv[a:a + 128]) for a in range(0, len(xv), 128)]
    t0 = time.perf_counter()
    exact = exact_block_traces(model, batches)
    exact_s = time.perf_counter() - t0
    flat_exact = torch.cat(list(exact.values()))
    sens_exact = sensitivity(exact, model)
    layers = len(exact)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        settings = {"hutchinson": {"max_probes": budget},
                    "layer-split": {"max_probes": max(2, budget // layers), "probe_groups": "layer"},
                    "hutch++": {"max_probes": budget, "estimator": "hutch++"}}
        for label, kw in settings.items():
            for seed in range(args.seeds):
                t = time.perf_counter()
                r = channel_traces(model, batches, min_probes=min(8, kw["max_probes"]), rel_stderr=1e-9, seed=seed,
                                   **kw)
                est = torch.cat([r.traces[n].double() for n in exact])
                rel = ((est - flat_exact).abs() / flat_exact.abs()).median()
                rows.append({"estimator": label, "hvps": budget, "seed": seed, "median_rel_error": float(rel),
                             "spearman_sensitivity": spearman(sensitivity(r.traces, model), sens_exact),
                             "seconds": time.perf_counter() - t})
                print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    r = channel_traces(model, batches, estimator="gauss-newton")
    est = torch.cat([r.traces[n].double() for n in exact])
    rows.append({"estimator": "gauss-newton", "hvps": 0, "seed": 0,
                 "median_rel_error": float(((est - flat_exact).abs() / flat_exact.abs()).median()),
                 "spearman_sensitivity": spearman(sensitivity(r.traces, model), sens_exact),
                 "seconds": time.perf_counter() - t})
    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for row in rows:
        key = f"{row['estimator']}@{row['hvps']}"
        summary.setdefault(key, []).append(row)
    table = {k: {"median_rel_error": statistics.mean(r["median_rel_error"] for r in v),
                 "spearman_sensitivity": statistics.mean(r["spearman_sensitivity"] for r in v),
                 "seconds": statistics.mean(r["seconds"] for r in v), "seeds": len(v)} for k, v in summary.items()}
    record = {"weights": int(sum(p.numel() for p in default_params(model).values())), "channels": len(flat_exact),
              "images": args.images, "exact_seconds": exact_s, "rows": rows, "summary": table}
    Path(args.out).write_text(json.dumps(record, indent=1))
    for k, v in table.items():
        print(f"{k:>18}: median rel. error {v['median_rel_error']:.3f}, Spearman of sensitivity "
              f"{v['spearman_sensitivity']:.3f}, {v['seconds']:.1f} s")


if __name__ == "__main__":
    main()
