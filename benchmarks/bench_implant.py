"""Benchmark: is a pruned + implanted (HAP Neural Implant) model as fast as its MACs suggest?

Two parts, both timed as CPU time of the calling thread (``time.thread_time``) with one
intra-op thread, channels_last, rounds interleaved so that load from other processes hits
every contender alike; each figure is the median (and the best) over ``--rounds`` rounds:

* ``layer``: one 16 -> 16 3x3 conv on 32x32 (batch 64) and its 13 kept filters alone, against
  the same layer with 3 of its 16 filters implanted, with the implanted channels re-ordered to
  their original positions (``channel_order``) or in plain ``[kept..., implanted...]`` order,
  under each ``execution`` (auto, split, dense), and re-ordered under the former ``forward``
  (cat + index_select, "legacy").
* ``model``: ResNet-20 (CIFAR, random weights) unpruned, pruned by ``l1`` to ``--target`` of
  its MACs, and pruned the same way with ``implant=0.1`` (implants in ``auto`` and in
  ``split`` execution); with ``--reordered`` also the implanted model as ``prune_to_budget``
  built it before channel orders were folded away (the fold is switched off for that prune),
  and that model run by the former ``forward`` (cat + index_select, "legacy").

    .venv/bin/python benchmarks/bench_implant.py --rounds 41 --reordered --out runs/bench_implant.json

Measured (shared 2-core AMD EPYC under load, 3 runs of 41 rounds, medians): ResNet-20 at half
the MACs runs 1.03-1.17x faster than unpruned with the legacy implant, 1.53-1.63x with the
default (folded, dense execution), 1.63-1.73x pruned by l1 alone; the implanted model executes
4% more MACs than it counts (implants run as centre-tap kxk filters) and its residual stream is
one channel wider. The 16 -> 16 layer: legacy 6.0 ms, split 3.2-3.5 (plain order) or 4.0
(re-ordered), auto 1.7, kept filters alone 1.8-2.5.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import types
from typing import Callable
from unittest import mock

import torch
from torch import Tensor, nn

from leanconv.cost import count
from leanconv.importance import create_criterion
from leanconv.layers.implant import ImplantConv2d
from leanconv.models import create
from leanconv.width import prune_to_budget


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=25, help="interleaved timed rounds (median reported)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target", type=float, default=0.5, help="MACs kept by pruning")
    p.add_argument("--implant", type=float, default=0.1, help="implant fraction of the pruned channels")
    p.add_argument("--reordered", action="store_true", help="also time the implanted model without the fold")
    p.add_argument("--out", default="", help="write the JSON record here")
    return p.parse_args()


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median and best CPU milliseconds of each call, one call of every contender per round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.thread_time()
            call()
            times[name].append((time.thread_time() - start) * 1e3)
    return {name: {"median": statistics.median(t), "best": min(t)} for name, t in times.items()}


def nhwc(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().to(memory_format=torch.channels_last)


def layer_contenders() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    reordered = ImplantConv2d.from_conv(conv, [1, 6, 11])
    nn.init.normal_(reordered.implant.weight)
    plain = copy.deepcopy(reordered)
    plain.set_channel_order(None)
    layers = {"dense": nhwc(conv), "kept_only": nhwc(reordered.conv)}
    for execution in ("auto", "split", "dense"):
        for label, layer in (("reordered", reordered), ("plain_order", plain)):
            layers[f"implant_{label}_{execution}"] = nhwc(layer)
            layers[f"implant_{label}_{execution}"].execution = execution
    layers["implant_reordered_legacy"] = legacy = nhwc(reordered)
    legacy.forward = types.MethodType(legacy_forward, legacy)
    return layers


def model_contenders(a: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = create("resnet20").eval()
    x = torch.randn(8, 3, 32, 32)
    models = {"unpruned": base}
    for label, implant in (("l1", 0.0), ("l1+implant", a.implant)):
        pruned = copy.deepcopy(base)
        prune_to_budget(pruned, create_criterion("l1"), x, target=a.target, implant=implant)
        models[label] = pruned
    if a.reordered:
        pruned = copy.deepcopy(base)
        with mock.patch("leanconv.width.budget.fold_channel_orders", lambda model, x: {}):
            prune_to_budget(pruned, create_criterion("l1"), x, target=a.target, implant=a.implant)
        models["l1+implant reordered"] = pruned
    for label in [k for k in models if "implant" in k]:
        models[f"{label} split"] = split = copy.deepcopy(models[label])
        for m in split.modules():
            if isinstance(m, ImplantConv2d):
                m.execution = "split"
    if a.reordered:
        models["l1+implant reordered legacy"] = legacy = copy.deepcopy(models["l1+implant reordered"])
        for m in legacy.modules():
            if isinstance(m, ImplantConv2d):
                m.forward = types.MethodType(legacy_forward, m)
    return models


def legacy_forward(self: ImplantConv2d, x: Tensor) -> Tensor:
    """ImplantConv2d.forward before this benchmark's change: both convs, cat, index_select."""
    ch, cw = self._crop
    xi = x[:, :, ch : x.shape[2] - ch, cw : x.shape[3] - cw] if (ch or cw) else x
    y = torch.cat([self.conv(x), self.implant(xi)], dim=1)
    return y if self.channel_order is None else y.index_select(1, self._order)


def describe(model: nn.Module) -> dict[str, int]:
    implants = [m for m in model.modules() if isinstance(m, ImplantConv2d)]
    return {"macs": count(model, (3, 32, 32)).macs, "implant_layers": len(implants),
            "implanted_channels": sum(m.implant.out_channels for m in implants),
            "reordered_layers": sum(m.channel_order is not None for m in implants)}


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    record: dict = {"batch": a.batch, "rounds": a.rounds, "clock": "thread_time, 1 thread, channels_last"}
    with torch.inference_mode():
        x = torch.randn(a.batch, 16, 32, 32).contiguous(memory_format=torch.channels_last)
        layers = layer_contenders()
        record["layer_ms"] = interleaved({k: (lambda m=m: m(x)) for k, m in layers.items()}, a.rounds)
    models = model_contenders(a)
    record["models"] = {k: describe(m) for k, m in models.items()}
    with torch.inference_mode():
        x = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        fast = {k: nhwc(m) for k, m in models.items()}
        record["model_ms"] = interleaved({k: (lambda m=m: m(x)) for k, m in fast.items()}, a.rounds)
    base_ms, base_macs = record["model_ms"]["unpruned"], record["models"]["unpruned"]["macs"]
    for k, info in record["models"].items():
        info["speedup_median"] = base_ms["median"] / record["model_ms"][k]["median"]
        info["speedup_best"] = base_ms["best"] / record["model_ms"][k]["best"]
        info["mac_reduction"] = base_macs / info["macs"]
    print(json.dumps(record, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
