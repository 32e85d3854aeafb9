"""Micro-benchmark: sliding-channel (SCC) and periodic sparse (pSConv) convs vs dense convs on CPU.

Each contender runs in both memory layouts (NCHW and channels_last) and is reported in its
faster one. Rounds are interleaved (every contender once per round) so that load from other
processes hits all of them alike; the table shows the median and the best round.

    python benchmarks/bench_new_convs.py --repeats 30 --out runs/bench_new_convs.json

Targets (issue "new efficient convolutions"): SCC forward >= 20x faster than the naive
gather-then-grouped-conv and >= 1.5x faster than a dense 1x1 conv; pSConv psd4_p8 inference
>= 1.3x faster than a dense 3x3 conv (batch 64, 128 -> 128 channels, 16x16, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from leanconv.layers import PeriodicSparseConv2d, SlidingChannelConv2d
from leanconv.layers._kernels import kernels_available

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per contender")
    p.add_argument("--out", default="runs/bench_new_convs.json", help="write the JSON record here ('' for none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", type=int, default=16, help="input height and width")
    p.add_argument("--groups", type=int, default=4, help="SCC groups")
    p.add_argument("--overlap", type=float, default=0.5, help="SCC overlap")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: perf_counter; thread: CPU time of the calling thread, robust to other "
                        "processes on a busy machine but meaningful only with --threads 1")
    return p.parse_args()


def contenders(a: argparse.Namespace) -> dict[str, dict[str, nn.Module]]:
    """Benchmark name -> contender name -> module."""
    c = a.channels
    scc = {impl: SlidingChannelConv2d(c, c, a.groups, a.overlap, impl=impl) for impl in ("kernel", "grouped", "gather")}
    psc = {pat: PeriodicSparseConv2d(c, c, pattern=pat, impl="kernel") for pat in ("psd4_p8", "psd2_p8", "psd1_p16", "ps4_p4")}
    return {
        "scc": {"dense_1x1": nn.Conv2d(c, c, 1, bias=False), "scc_kernel": scc["kernel"],
                "scc_grouped": scc["grouped"], "scc_gather": scc["gather"]},
        "psc": {"dense_3x3": nn.Conv2d(c, c, 3, padding=1, bias=False),
                "psc_reference": PeriodicSparseConv2d(c, c, pattern="psd4_p8", impl="reference"),
                **{f"psc_{k}": m for k, m in psc.items()}},
    }


def step(module: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        def run() -> None:
            with torch.no_grad():
                module(x)
        return run
    xg = x.detach().requires_grad_()
    grad = None

    def run_train() -> None:
        nonlocal grad
        y = module(xg)
        grad = torch.ones_like(y) if grad is None else grad
        y.backward(grad)
    return run_train


def time_all(fns: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Interleaved rounds; seconds per call for each function."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return times


def bench(group: dict[str, nn.Module], x: torch.Tensor, train: bool, repeats: int,
          clock: Callable[[], float]) -> dict[str, dict]:
    fns, keys = {}, {}
    for name, module in group.items():
        for layout, fmt in LAYOUTS.items():
            fns[f"{name}/{layout}"] = step(module, x.contiguous(memory_format=fmt), train)
            keys[f"{name}/{layout}"] = (name, layout)
    times = time_all(fns, repeats, clock)
    best: dict[str, dict] = {}
    for key, ts in times.items():
        name, layout = keys[key]
        rec = {"layout": layout, "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)}
        if name not in best or rec["median_ms"] < best[name]["median_ms"]:
            best[name] = rec
    return best


def ratios(res: dict[str, dict], fast: str, baselines: list[str]) -> dict[str, dict[str, float]]:
    """Speed-ups of ``fast`` over each baseline, from the medians and from the best rounds
    (the best round is the steadier figure when other processes share the CPU)."""
    return {f"{b}/{fast}": {stat: res[b][f"{stat}_ms"] / res[fast][f"{stat}_ms"] for stat in ("median", "min")}
            for b in baselines}


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    groups = contenders(a)
    clock = time.perf_counter if a.clock == "wall" else time.thread_time
    record = {"config": vars(a), "torch": torch.__version__, "machine": platform.machine(),
              "cpu": platform.processor(), "kernels": kernels_available(), "loadavg_before": os.getloadavg(),
              "results": {}, "ratios": {}}
    for bench_name, group in groups.items():
        for mode, train in (("forward", False), ("forward_backward", True)):
            res = bench(group, x, train, a.repeats, clock)
            record["results"][f"{bench_name}/{mode}"] = res
            print(f"\n{bench_name} {mode} (batch {a.batch}, {a.channels}->{a.channels}, {a.size}x{a.size}, "
                  f"{a.threads} threads, {a.clock} clock)")
            print(f"  {'contender':<18}{'layout':<15}{'median ms':>10}{'min ms':>10}")
            for name, r in res.items():
                print(f"  {name:<18}{r['layout']:<15}{r['median_ms']:>10.3f}{r['min_ms']:>10.3f}")
            if bench_name == "scc":
                rat = ratios(res, "scc_kernel", ["scc_gather", "dense_1x1", "scc_grouped"])
            else:
                rat = ratios(res, "psc_psd4_p8", ["dense_3x3", "psc_reference"])
            record["ratios"][f"{bench_name}/{mode}"] = rat
            for key, r in rat.items():
                print(f"  speed-up {key:<28} median {r['median']:6.2f}x   best {r['min']:6.2f}x")
    record["loadavg_after"] = os.getloadavg()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
