"""A trained model converted to the new layers: random start against a start fitted to the trained layers.

For each conversion of the trained ResNet-20 (Fashion-MNIST, 10 epochs; any checkpoint with
``--ckpt``) and each start (``random``: fresh layers from the seed, as the papers train them;
``fit``: each new layer fitted by least squares to the trained layer it replaces,
:func:`leanconv.convs.init_fit.fit_layers`), the test accuracy right after the conversion
(BatchNorm re-estimated on training images, no fine-tuning) and after 1 and 3 fine-tuning
epochs, each fine-tuning started again from the same converted model. Fine-tuning rates: 0.05
after a random start, 0.01 after a fitted one (``leanconv convert``'s defaults), or ``--lr``;
``--distill`` fine-tunes by distillation from the dense model; ``--reorder`` renumbers the
trained model's channels for the pSConv pattern before the fit; ``--tag`` labels the setting. Rows append to
a JSON-lines file as they finish; a rerun skips those already there.

    .venv/bin/python benchmarks/bench_convert_accuracy.py --out benchmarks/results/convert_accuracy.jsonl
    .venv/bin/python benchmarks/bench_convert_accuracy.py --ckpt CKPT --data synthetic --epochs 1 \
        --conversions psconv:psd4_p8 --out /tmp/smoke.jsonl                  # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.convs.convert import conversion_targets, convert
from leanconv.convs.init_fit import fit_layers
from leanconv.convs.pattern_order import order_for_pattern
from leanconv.data import load_dataset
from leanconv.runs.record import one_shot
from leanconv.train import evaluate, finetune
from leanconv.train.distill import Distillation

LR = {"random": 0.05, "fit": 0.01}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="benchmarks/results/r20_fm10/model.safetensors")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--conversions", nargs="+", default=["psconv:psd4_p8", "scc:2", "scc:4"])
    p.add_argument("--inits", nargs="+", default=["fit", "random"], choices=list(LR))
    p.add_argument("--epochs", nargs="+", type=int, default=[1, 3], help="fine-tuning lengths (default 1 3)")
    p.add_argument("--fit-images", type=int, default=512)
    p.add_argument("--train-subset", type=int, default=None, help="fine-tune on the first N images (default all)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning rate (default: 0.05 random, 0.01 fit)")
    p.add_argument("--distill", action="store_true", help="fine-tune by distillation from the dense model")
    p.add_argument("--reorder", action="store_true",
                   help="psconv, fitted start: renumber the trained model's channels for the pattern first")
    p.add_argument("--tag", default="", help="a label for this setting in the rows (e.g. lr0.003)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/convert_accuracy.jsonl")
    return p.parse_args()


def start(base: torch.nn.Module, conversion: str, init: str, data, a: argparse.Namespace) -> tuple:
    to, arg = conversion.split(":")
    dense = copy.deepcopy(base)
    order = None
    if a.reorder and init == "fit" and to == "psconv":
        example = next(iter(data.loader("train", 16)))[0]
        order = order_for_pattern(dense, example, conversion_targets(dense, "psconv"), arg)
    model = copy.deepcopy(dense)
    torch.manual_seed(a.seed)
    convert(model, to, **({"pattern": arg} if to == "psconv" else {"groups": int(arg)}))
    paths = model.leanconv_meta["conversions"][-1]["layers"]
    fits = None
    if init == "fit":
        images = (x for x, _ in data.loader("train", 128, subset=a.fit_images))
        fits = fit_layers(dense, model, paths, images)
    return model, fits, order


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    done = set()
    if out.exists():
        done = {(r["conversion"], r["init"], r["epochs"], r.get("tag", ""), r.get("seed", 0)) for r in
                map(json.loads, out.read_text().splitlines())}
    base = checkpoint.load(a.ckpt).eval()
    data = load_dataset(a.data)
    shape = tuple(base.leanconv_meta["input_shape"])
    test = data.loader("test", 256)
    dense = evaluate(base, test)["accuracy"]
    print(f"dense {a.ckpt}: {dense:.2f}%")
    for conversion in a.conversions:
        for init in a.inits:
            t0 = time.perf_counter()
            if all((conversion, init, e, a.tag, a.seed) in done for e in a.epochs):
                continue
            model, fits, order = start(base, conversion, init, data, a)
            fit_s = time.perf_counter() - t0
            right = one_shot(model, shape, test, data, None, 128)
            print(f"{conversion} {init}: right after {right['test_accuracy']:.2f}% (fit {fit_s:.0f} s)", flush=True)
            for epochs in a.epochs:
                if (conversion, init, epochs, a.tag, a.seed) in done:
                    continue
                tuned = copy.deepcopy(model)
                t1 = time.perf_counter()
                lr = a.lr if a.lr is not None else LR[init]
                loss = Distillation(copy.deepcopy(base)) if a.distill else None
                finetune(tuned, data, epochs=epochs, lr=lr, seed=a.seed, images=a.train_subset, loss=loss)
                acc = evaluate(tuned, test)["accuracy"]
                row = {"conversion": conversion, "init": init, "epochs": epochs, "dense": dense,
                       "right_after": right["test_accuracy"], "stale_bn": right["test_accuracy_stale_bn"],
                       "after": acc, "gap": acc - dense, "lr": lr, "distill": a.distill, "tag": a.tag,
                       "fit_seconds": fit_s, "reorder": order,
                       "finetune_seconds": time.perf_counter() - t1, "fit": fits, "macs": right["macs"],
                       "train_subset": a.train_subset, "seed": a.seed}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {epochs} epoch(s): {acc:.2f}% ({acc - dense:+.2f} vs dense)", flush=True)


if __name__ == "__main__":
    main()
