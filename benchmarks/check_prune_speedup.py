"""Does pruning to half the MACs make the model measurably faster? Every method, side by side.

For each criterion the trained checkpoint is pruned to ``--target`` of its MACs (no
fine-tuning: this checks the structure, not the accuracy), then:
- counted MACs must land within 2% of the target;
- the saved pruned checkpoint must reload to identical logits;
- latency at batch 64 (and 1) is measured for the original and the pruned model in
  alternating rounds (so drift hits both), and the measured speedup is printed next to the
  MAC reduction. Target: speedup >= 0.8 x MAC reduction at batch 64.
- the same at batch 64 in the deployment form (BatchNorm folded into its conv, both models);
- with ``--onnx``, also at batch 64 in ONNX Runtime (both models exported; ORT folds BatchNorm
  and fuses activations itself). ORT is timed by wall clock on the same thread count
  (1 with ``--clock cpu``), so run it on a quiet machine.

- with ``--stages``, each top-level module (stem, each stage, head) timed alone by forward
  hooks in the BN-folded form (thread CPU time: use with ``--threads 1``): its share of the
  time and of the MACs, and its own speedup next to its own MAC reduction.

``--round-to auto`` keeps every pruned channel count a multiple of this CPU's float32 vector
width (see leanconv.cost.hardware), as ``leanconv prune --round-to auto`` does.

    .venv/bin/python benchmarks/check_prune_speedup.py runs/r20_fm10/model.safetensors --out runs/speedup_r20.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.runs.compare import WIDTH
from leanconv.runs.prune import round_to_arg
from leanconv.cost import count, measure_fastest_layout, measure_latency, measure_onnx_latency
from leanconv.deploy.onnx import export_onnx
from leanconv.deploy.fold import fold_batchnorm
from leanconv.data import load_dataset
from leanconv.importance import ScoringData, create_criterion
from leanconv.width import prune_to_budget

METHODS = list(WIDTH)  # label -> (criterion, implant share), as `leanconv compare` runs them


def prune_copy(model, label, target, shape, data, round_to, latency_aware=False):
    method, implant = WIDTH[label]
    kwargs = {"max_probes": 16, "min_probes": 8} if method == "hap" else {}
    pruned = copy.deepcopy(model)
    scoring = ScoringData(data.scoring_batches(256, 128), extra={"input_shape": shape})
    prune_to_budget(pruned, create_criterion(method, **kwargs), torch.randn(1, *shape), target=target,
                    input_shape=shape, data=scoring, implant=implant, round_to=round_to,
                    latency_aware=latency_aware)
    return pruned


def latency_pair(a, b, shape, batch, rounds, repeats, clock, fold_bn=False, layout="fastest"):
    """Median over alternating rounds of each model's latency; ``layout="fastest"`` times each
    model in NCHW and channels_last and keeps its faster one (as ``leanconv prune`` records)."""
    time = measure_fastest_layout if layout == "fastest" else measure_latency
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(time(a, shape, batch, repeats=repeats, warmup=2, clock=clock, fold_bn=fold_bn).median_ms)
        tb.append(time(b, shape, batch, repeats=repeats, warmup=2, clock=clock, fold_bn=fold_bn).median_ms)
    return statistics.median(ta), statistics.median(tb)


def onnx_pair(a, b, shape, rounds, repeats, threads):
    """Median over alternating rounds of each model's ONNX Runtime latency at batch 64."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{name}.onnx" for name in ("a", "b")]
        for net, path in zip((a, b), paths):
            export_onnx(net, shape, path, latency=False)
        times = [[], []]
        for _ in range(rounds):
            for t, path in zip(times, paths):
                t.append(measure_onnx_latency(path, shape, 64, repeats=repeats, warmup=2, threads=threads).median_ms)
    return statistics.median(times[0]), statistics.median(times[1])


def stage_times(model, shape, repeats) -> dict[str, float]:
    """Thread CPU time (ms, median of ``repeats``) of each top-level child of the BN-folded
    model in channels_last at batch 64, 1 thread, by forward hooks."""
    net = fold_batchnorm(copy.deepcopy(model).eval(), torch.randn(2, *shape)).to(memory_format=torch.channels_last)
    start, runs = {}, []
    for name, child in net.named_children():
        child.register_forward_pre_hook(lambda mod, a, name=name: start.__setitem__(name, time.thread_time()))
        child.register_forward_hook(lambda mod, a, o, name=name: runs[-1].__setitem__(
            name, runs[-1].get(name, 0.0) + time.thread_time() - start[name]))
    x = torch.randn(64, *shape).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for i in range(repeats + 2):
            runs.append({})
            net(x)
    runs = runs[2:]
    return {name: 1e3 * statistics.median(r[name] for r in runs) for name in runs[0]}


def stage_split(model, pruned, shape, rounds, repeats) -> list[dict]:
    """Per top-level child: its share of the original's MACs and (BN-folded) time, and its own
    MAC reduction and speedup after pruning: which parts the cut could not speed up."""
    macs = [{}, {}]
    for m, out in zip((model, pruned), macs):
        for layer in count(m, shape).layers:
            top = layer.name.split(".")[0]
            out[top] = out.get(top, 0) + layer.macs
    times = [[], []]
    for _ in range(rounds):
        for m, t in zip((model, pruned), times):
            t.append(stage_times(m, shape, repeats))
    t0, t1 = ({k: statistics.median(r[k] for r in t) for k in t[0]} for t in times)
    total_macs, total_ms = sum(macs[0].values()), sum(t0.values())
    return [{"module": k, "macs_share": macs[0].get(k, 0) / total_macs, "time_share": t0[k] / total_ms,
             "ms": [t0[k], t1[k]], "mac_reduction": macs[0].get(k, 0) / max(macs[1].get(k, 0), 1),
             "speedup": t0[k] / t1[k]} for k in t0 if t0[k] / total_ms >= 0.01]


def identical_reload(model, shape) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        checkpoint.save(model, path)
        again = checkpoint.load(path)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        return torch.equal(model.eval()(x), again(x))


def check_one(label, model, pruned, shape, macs0, args) -> dict:
    """Budget, reload and the three side-by-side speedups (b64, b1, b64 with BN folded) of one cut."""
    macs = count(pruned, shape).macs

    def pair(batch, repeats, fold_bn=False):
        return latency_pair(model, pruned, shape, batch, args.rounds, repeats, args.clock, fold_bn=fold_bn,
                            layout=args.layout)

    b64, b1, folded = pair(64, args.repeats), pair(1, args.repeats * 3), pair(64, args.repeats, fold_bn=True)
    row = {"method": label, "macs_ratio": macs / macs0, "within_2pct": abs(macs / macs0 - args.target) <= 0.02 * args.target,
           "reload_identical": identical_reload(pruned, shape), "mac_reduction": macs0 / macs,
           "latency_b64_ms": b64, "speedup_b64": b64[0] / b64[1], "latency_b1_ms": b1, "speedup_b1": b1[0] / b1[1],
           "latency_b64_bn_folded_ms": folded, "speedup_b64_bn_folded": folded[0] / folded[1],
           "channels": [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]}
    row["speedup_over_mac_reduction"] = row["speedup_b64"] / row["mac_reduction"]
    row["bn_folded_speedup_over_mac_reduction"] = row["speedup_b64_bn_folded"] / row["mac_reduction"]
    if args.onnx:
        threads = 1 if args.clock == "cpu" else torch.get_num_threads()
        ort = onnx_pair(model, pruned, shape, args.rounds, args.repeats, threads)
        row.update(latency_b64_onnx_ms=ort, speedup_b64_onnx=ort[0] / ort[1],
                   onnx_speedup_over_mac_reduction=ort[0] / ort[1] / row["mac_reduction"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--round-to", default=None, help="N or auto (this CPU's float32 vector width), as leanconv prune")
    parser.add_argument("--latency-aware", action="store_true", help="prune with leanconv prune --latency-aware")
    parser.add_argument("--layout", choices=["fastest", "channels_last"], default="fastest",
                        help="fastest: each model in its faster memory layout, as leanconv prune records (default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: thread CPU time on 1 thread, immune to other processes on a busy machine")
    parser.add_argument("--onnx", action="store_true", help="also time both models in ONNX Runtime (wall clock)")
    parser.add_argument("--stages", action="store_true",
                        help="also time each top-level module (BN folded, 1 thread, CPU time): where the speedup is lost")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    round_to = None if args.round_to is None else round_to_arg(args.round_to)
    model = checkpoint.load(args.ckpt)
    shape = tuple(model.leanconv_meta["input_shape"])
    data = load_dataset(model.leanconv_meta["dataset"]["name"])
    macs0 = count(model, shape).macs
    rows = []
    print(f"{args.ckpt}: {macs0 / 1e6:.2f} M MACs, input {shape}, "
          f"{1 if args.clock == 'cpu' else torch.get_num_threads()} threads, {args.clock} clock")
    for label in args.methods.split(","):
        pruned = prune_copy(model, label, args.target, shape, data, round_to, args.latency_aware)
        row = check_one(label, model, pruned, shape, macs0, args)
        rows.append(row)
        print(f"{label:12s} MACs x{row['macs_ratio']:.3f} (within 2%: {row['within_2pct']}), reload identical: "
              f"{row['reload_identical']}, MAC reduction {row['mac_reduction']:.2f}x, measured speedup b64 "
              f"{row['speedup_b64']:.2f}x (ratio {row['speedup_over_mac_reduction']:.2f}, target >= 0.8), "
              f"b1 {row['speedup_b1']:.2f}x; BN folded: b64 {row['speedup_b64_bn_folded']:.2f}x "
              f"(ratio {row['bn_folded_speedup_over_mac_reduction']:.2f})"
              + (f"; ONNX Runtime: b64 {row['speedup_b64_onnx']:.2f}x (ratio {row['onnx_speedup_over_mac_reduction']:.2f})"
                 if args.onnx else ""), flush=True)
        if args.stages:
            row["stages"] = stage_split(model, pruned, shape, args.rounds, args.repeats)
            for st in row["stages"]:
                print(f"    {st['module']:10s} {st['time_share']:.2f} of the time, {st['macs_share']:.2f} of the MACs; "
                      f"speedup {st['speedup']:.2f}x for a MAC reduction of {st['mac_reduction']:.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"ckpt": args.ckpt, "target": args.target, "round_to": round_to,
                                              "round_to_arg": args.round_to,
                                              "latency_aware": args.latency_aware,
                                              "clock": args.clock, "layout": args.layout, "onnx": args.onnx,
                                              "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
