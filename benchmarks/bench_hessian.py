"""Throughput of Hutchinson probes for per-channel Hessian traces, and HAP sensitivity wall time.

Part 1 (``--model``): seconds per probe for every HVP method (vmap, double backward, lean
double backward) at each ``--steps`` value (probes per step; 1 = one probe at a time), with a
fixed number of probes (``min_probes = max_probes``); the first call of each configuration is
a discarded warm-up. ``batched_vs_single`` gives, per method and overall, the throughput of
the best batched step over the best one-probe-at-a-time configuration. It also reports
the median relative standard error per probe-equivalent for plain Hutchinson and for
layer-split probes (``probe_groups="layer"``), i.e. which one buys more precision per HVP.
``cost_split`` times the two parts of a step apart: the forward+backward that all of a
step's probes share, and the second backward each probe needs alone; with FLOPs counted
too, it gives the ceiling any number of probes per step can reach (``1 + shared / per_probe``).
Part 2 (``--sens-model``, default resnet56): wall time of ``channel_traces`` with its
default stopping rule on ``--sens-images`` images (512), as HAP would run it.

Without ``--dataset`` the images are synthetic N(0, 1) tensors of 3 x size x size with random
labels (timing only: the traces mean nothing). Models come from the leanconv zoo; a name the
zoo lacks falls back to a small local CNN (said so in the record). Writes a JSON record.

    .venv/bin/python benchmarks/bench_hessian.py --smoke                # seconds, tiny
    .venv/bin/python benchmarks/bench_hessian.py --out runs/bench_hessian.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from leanconv.importance.hessian import _select, channel_traces
from leanconv.importance.hessian.hvp import HVP_METHODS, _LeanOps, rademacher_probes
from leanconv.util.modes import eval_mode


def local_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Fallback when the zoo lacks the model: conv-BN-ReLU x3 with stride, pool, linear."""
    layers, c = [], in_channels
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [nn.Conv2d(c, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def build_model(name: str, num_classes: int, size: int) -> tuple[nn.Module, str]:
    try:
        from leanconv.models import create, names

        if name in names():
            return create(name, num_classes=num_classes, input_size=size), name
    except ImportError:
        pass
    return local_cnn(num_classes), f"local_cnn (zoo has no {name!r})"


def make_batches(args, images: int) -> list:
    if args.dataset:
        from leanconv.data import load_dataset

        ds = load_dataset(args.dataset)
        mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
        std = torch.tensor(ds.std).view(1, -1, 1, 1)
        x = (ds.val.images[:images].float() / 255 - mean) / std
        y = ds.val.labels[:images]
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(images, 3, args.size, args.size, generator=g)
        y = torch.randint(0, args.num_classes, (images,), generator=g)
    return [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)]


def throughput(model, batches, args) -> list[dict]:
    """Seconds per probe for each (method, probes_per_step), after one warm-up call."""
    rows = []
    configs = [(m, s) for m in HVP_METHODS for s in args.steps]
    for method, step in configs:
        kw = dict(min_probes=args.probes, max_probes=args.probes, probes_per_step=step, method=method)
        channel_traces(model, batches, **{**kw, "min_probes": 2, "max_probes": 2})  # warm-up
        r = channel_traces(model, batches, **kw)
        rows.append({"method": method, "probes_per_step": step, "probes": r.probes,
                     "seconds": round(r.seconds, 3), "seconds_per_probe": round(r.seconds / r.probes, 4)})
    return rows


def batching_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per method: throughput of its best probes_per_step over its probes_per_step = 1; and
    ``"overall"``: the best batched configuration of any method over the best one-probe
    configuration of any method (the honest baseline: the fastest way to do one at a time)."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        mine = {r["probes_per_step"]: r["seconds_per_probe"] for r in rows if r["method"] == method}
        if 1 in mine and len(mine) > 1:
            best = min((s for s in mine if s != 1), key=lambda s: mine[s])
            out[method] = {"best_step": best, "ratio": mine[1] / mine[best]}
    single = [r for r in rows if r["probes_per_step"] == 1]
    batched = [r for r in rows if r["probes_per_step"] != 1]
    if single and batched:
        s = min(single, key=lambda r: r["seconds_per_probe"])
        b = min(batched, key=lambda r: r["seconds_per_probe"])
        out["overall"] = {"single_method": s["method"], "single_seconds_per_probe": s["seconds_per_probe"],
                          "best_method": b["method"], "best_step": b["probes_per_step"],
                          "best_seconds_per_probe": b["seconds_per_probe"],
                          "ratio": s["seconds_per_probe"] / b["seconds_per_probe"]}
    return out


def cost_split(model, batches, repeats: int = 3) -> dict:
    """Where one probe's time goes in the lean double backward, summed over the batches: the forward+backward
    that builds the gradient graph (``shared``: one per step, whatever the step size) and the
    second backward that every probe needs alone (``per_probe``). Sharing the first among
    ``k`` probes gives at most ``(shared + per_probe) / (shared / k + per_probe)``, which tends
    to ``1 + shared / per_probe`` as ``k`` grows: the ceiling of batching probes this way.
    Times are the fastest of ``repeats``; FLOPs are counted by ``torch.utils.flop_counter``
    (convolutions and matrix products), which gives the same ceiling free of timing noise."""
    from torch.utils.flop_counter import FlopCounterMode

    sel, fixed = _select(model, None)
    names = list(sel)
    v = {n: t[0] for n, t in rademacher_probes(torch.Generator().manual_seed(0), sel, 1).items()}

    def one_batch(x, y, count: bool) -> list[float]:
        """[shared s, per-probe s] for one batch, or their FLOPs with ``count``."""
        modes = [FlopCounterMode(display=False) if count else contextlib.nullcontext() for _ in range(2)]
        leaves = {n: sel[n].clone().requires_grad_(True) for n in names}
        t0 = time.perf_counter()
        with modes[0]:
            loss = nn.functional.cross_entropy(torch.func.functional_call(model, {**fixed, **leaves}, (x,)), y)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        t1 = time.perf_counter()
        with modes[1]:
            torch.autograd.grad(sum((g * v[n]).sum() for g, n in zip(grads, names)), list(leaves.values()))
        t2 = time.perf_counter()
        return [m.get_total_flops() for m in modes] if count else [t1 - t0, t2 - t1]

    def total(count: bool) -> list[float]:
        return [sum(p) for p in zip(*(one_batch(x, y, count) for x, y in batches))]

    with eval_mode(model), _LeanOps():
        flops = total(count=True)  # also the warm-up
        shared, per_probe = (min(t) for t in zip(*(total(count=False) for _ in range(repeats))))
    return {"method": "lean_double_backward", "shared_seconds": round(shared, 4),
            "per_probe_seconds": round(per_probe, 4), "ceiling": round(1 + shared / per_probe, 3),
            "shared_gflops": round(flops[0] / 1e9, 3), "per_probe_gflops": round(flops[1] / 1e9, 3),
            "flop_ceiling": round(1 + flops[0] / flops[1], 3)}


def precision_per_hvp(model, batches, args) -> list[dict]:
    """Median over channels of the per-probe relative standard deviation, scaled to one HVP."""
    rows = []
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for groups, probes in ((1, args.probes), ("layer", max(2, args.probes // n_layers))):
        r = channel_traces(model, batches, min_probes=probes, max_probes=probes, probe_groups=groups,
                           probes_per_step=max(args.steps), method="vmap")
        hvps = r.probes * (n_layers if groups == "layer" else 1)
        tr = torch.cat(list(r.traces.values())).double()
        se = torch.cat(list(r.stderr.values())).double()
        rel = (se * hvps**0.5 / tr.abs())[tr != 0]  # relative stderr if this cost were ONE HVP
        rows.append({"probe_groups": groups, "probes": r.probes, "hvps": hvps, "seconds": round(r.seconds, 3),
                     "median_rel_stderr": float((se / tr.abs())[tr != 0].median()),
                     "median_rel_stderr_per_hvp": float(rel.median())})
    return rows


def sensitivity_time(args) -> dict:
    model, label = build_model(args.sens_model, args.num_classes, args.size)
    batches = make_batches(args, args.sens_images)
    r = channel_traces(model, batches, min_probes=args.sens_min_probes, max_probes=args.sens_max_probes,
                       probes_per_step=max(args.steps))
    return {"model": label, "images": args.sens_images, "probes": r.probes, "converged": r.converged,
            "achieved_rel_stderr": r.achieved_rel_stderr, "method": r.method, "seconds": round(r.seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--images", type=int, default=128, help="images for the throughput part")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="input side in pixels")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8],
                   help="probes_per_step values to time (default: 1,4,8)")
    p.add_argument("--probes", type=int, default=16, help="probes per timed configuration")
    p.add_argument("--sens-model", default="resnet56")
    p.add_argument("--sens-images", type=int, default=512)
    p.add_argument("--sens-min-probes", type=int, default=8)
    p.add_argument("--sens-max-probes", type=int, default=64)
    p.add_argument("--skip-sensitivity", action="store_true")
    p.add_argument("--dataset", default=None, help="e.g. cifar10; default: synthetic random images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the script runs, times nothing")
    p.add_argument("--out", default=None, help="write the JSON record here")
    args = p.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.size, args.probes, args.steps = 8, 4, 8, 4, [1, 4]
        args.sens_model, args.sens_images, args.sens_min_probes, args.sens_max_probes = "resnet20", 8, 2, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    model, label = build_model(args.model, args.num_classes, args.size)
    batches = make_batches(args, args.images)
    record = {
        "benchmark": "hessian", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "smoke": args.smoke,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "model": label,
        "throughput": throughput(model, batches, args),
        "cost_split": cost_split(model, batches),
        "precision": precision_per_hvp(model, batches, args),
        "sensitivity": None if args.skip_sensitivity else sensitivity_time(args),
    }
    record["batched_vs_single"] = batching_ratios(record["throughput"])
    text = json.dumps(record, indent=2)
    print(text)
    for method, ratio in record["batched_vs_single"].items():
        if method == "overall":
            print(f"overall: {ratio['best_method']} at {ratio['best_step']} probes per step, "
                  f"{ratio['best_seconds_per_probe']:.3f} s/probe, gives {ratio['ratio']:.2f}x the throughput of the "
                  f"best one-probe-at-a-time method ({ratio['single_method']}, "
                  f"{ratio['single_seconds_per_probe']:.3f} s/probe; target >= 1.5)")
        else:
            print(f"{method}: batched probes {ratio['best_step']} per step give {ratio['ratio']:.2f}x the throughput "
                  f"of one probe at a time")
    c = record["cost_split"]
    print(f"{args.images} images, lean double backward: forward+backward shared by a step's probes {c['shared_seconds']:.3f} s "
          f"({c['shared_gflops']:.2f} GFLOP), second backward per probe {c['per_probe_seconds']:.3f} s "
          f"({c['per_probe_gflops']:.2f} GFLOP): batching can give at most {c['ceiling']:.2f}x by time, "
          f"{c['flop_ceiling']:.2f}x by FLOPs")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
