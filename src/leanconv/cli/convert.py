"""``leanconv convert MODEL_OR_CKPT``: swap convs for DSXplore DW-SCC blocks or pSConv layers.

Convert a zoo model or a checkpoint: --to scc turns the convs DSXplore picks (ResNet: conv2
of every block; VGG: every 3x3 but the first; MobileNetV2: the 1x1 expand and project convs)
into depthwise + sliding-channel convs; --to psconv turns every dense 3x3 conv but the first
into a periodic sparse conv. --where auto times each of those layers alone, in every exact
form --runtime can run, side by side with the dense conv, and converts only where the fastest
form is faster (that form is kept); or name the layers. The new layers start from the
trained ones they replace, fitted by least squares on training images (--init fit, the
default when there is data), or fresh from --seed (--init random); other weights are kept.
The converted model is judged right away (after a random start with BatchNorm statistics
re-estimated), and with --finetune-epochs fine-tuned and timed side by side with the
original. Writes DIR/model.safetensors and DIR/convert.json and prints the counted params
and MACs before and after, the fit, accuracy and speed.

The placement rules are those of :mod:`leanconv.convs.convert`, the run that of
:mod:`leanconv.runs.convert`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.cli.common import (add_build_args, add_config_options, add_model_args, build_config, classes_arg,
                                 load_model, parse_kwargs, parse_shape, progress_bar, source_from_args)
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError
from leanconv.models import names
from leanconv.runs.convert import ConvertConfig, run_convert
from leanconv.runs.source import Source

__all__ = ["HELP", "add_arguments", "run"]


HELP = "swap convs for DW + sliding-channel (SCC) or periodic sparse (pSConv) layers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="MODEL_OR_CKPT", help=f"a checkpoint, a zoo model ({', '.join(names())}) or PKG.MODULE:FN")
    add_config_options(p, ConvertConfig)
    p.add_argument("--data", default=None, help="the dataset (fashion-mnist, cifar10, cifar100, synthetic); for a "
                   "zoo name, the one whose input shape and classes the model takes, recorded in the checkpoint "
                   "(default: a checkpoint's own)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the system copy)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="zoo names only: input shape (default: the dataset's, else 3,32,32)")
    p.add_argument("--num-classes", type=classes_arg, default=None,
                   help="zoo names only: classes (default: the dataset's, else 10)")
    add_model_args(p)
    add_build_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(out_is_folder=True)


def _zoo_source(args: argparse.Namespace, config: ConvertConfig) -> Source:
    """A zoo model freshly initialised from ``--seed`` (with the data's shape and classes)."""
    shape, classes, data = args.input_shape, args.num_classes, None
    if args.data is not None:
        data = load_dataset(args.data, args.data_dir)
        if shape is not None and shape[0] != data.in_channels:
            raise LeanconvError(f"--input-shape has {shape[0]} channels but {data.name} has {data.in_channels}")
        if classes is not None and classes != data.num_classes:
            raise LeanconvError(f"--num-classes {classes} disagrees with {data.name}, which has {data.num_classes}")
        shape = shape or (data.in_channels, data.image_size, data.image_size)
        classes = data.num_classes
    torch.manual_seed(config.seed)
    model = load_model(args.source, input_shape=shape or (3, 32, 32), num_classes=classes, kwargs=parse_kwargs(args.arg))
    if data is not None:
        model.leanconv_meta["dataset"] = {"name": data.name, "data_dir": args.data_dir}
    words = [args.source, *(["--input-shape", ",".join(map(str, args.input_shape))] if args.input_shape else []),
             *(["--num-classes", str(args.num_classes)] if args.num_classes else []),
             *(["--data", data.name] if data is not None else []),
             *(["--data-dir", args.data_dir] if args.data_dir is not None else [])]
    return Source(data, model=model, data_dir=args.data_dir, label=args.source, words=tuple(words))


def _source(args: argparse.Namespace, config: ConvertConfig) -> Source:
    if (args.source in names() or ":" in args.source) and not Path(args.source).exists():
        return _zoo_source(args, config)
    given = [flag for flag, value in (("--input-shape", args.input_shape), ("--num-classes", args.num_classes))
             if value is not None]
    if given:
        raise LeanconvError(f"{', '.join(given)} apply to zoo model names only; a checkpoint keeps the input shape "
                            "and classes it records")
    if config.finetune_epochs == 0 and args.data is None and config.init != "fit":
        model = checkpoint.load(args.source, constructor=args.constructor)
        if config.init == "random" or not model.leanconv_meta.get("dataset"):  # no data needed, none recorded
            shape = None if model.leanconv_meta.get("input_shape") else (3, 32, 32)
            return Source(None, checkpoint=Path(args.source), constructor=args.constructor, input_shape=shape)
    return source_from_args(args, args.source)


def run(args: argparse.Namespace) -> int:
    config = build_config(ConvertConfig, args)
    source = _source(args, config)
    out = Path(args.out)
    update, close = progress_bar(f"fine-tune {config.spec().name}", enabled=not args.no_progress)
    try:
        result = run_convert(config, source, out=out, progress=update)
    finally:
        close()
    result.save(out, constructor=args.constructor)
    record = result.record.to_dict()
    print(json.dumps(record) if args.json else _summary(record, result.model, out))
    return 0


def _summary(record: dict, model: torch.nn.Module, out: Path) -> str:
    b, a = record["before"], record["after"]
    data = (model.leanconv_meta.get("dataset") or {}).get("name", "DATA")
    saved = out / "model.safetensors"
    lines = [
        f"converted {len(record['layers'])} layers to {record['name']} (input {','.join(map(str, record['input_shape']))})",
        f"{'':8}{'params':>12}{'MACs':>14}",
        f"{'before':8}{b['params']:>12,}{b['macs'] / 1e6:>12.2f} M",
        f"{'after':8}{a['params']:>12,}{a['macs'] / 1e6:>12.2f} M",
        f"{'ratio':8}{a['params'] / b['params']:>12.3f}{a['macs'] / b['macs']:>14.3f}",
    ]
    fit = record.get("fit")
    if fit:
        worst = max(fit, key=lambda p: fit[p]["unexplained"])
        lines.append(f"started from the trained layers: median unexplained output "
                     f"{_median([f['unexplained'] for f in fit.values()]):.3f} (worst {worst}: "
                     f"{fit[worst]['unexplained']:.3f})")
    timings = record.get("layer_timings")
    if timings:
        lines.append(f"--where auto: {len(record['layers'])} of {len(timings)} layers measured faster as "
                     f"{record['name']} on {record['config']['runtime']}")
    epochs = record["config"]["finetune_epochs"]
    if "test_accuracy" in a:
        right = record.get("converted", {}).get("test_accuracy")
        lines.append(f"test accuracy {b['test_accuracy']:.2f}% before"
                     + (f", {right:.2f}% right after conversion (BatchNorm re-estimated)" if right is not None else "")
                     + (f", {a['test_accuracy']:.2f}% after {epochs} fine-tuning epochs" if epochs else ""))
        if record.get("timing"):
            lines.append(_speed_line(record["timing"]))
    if "test_accuracy" in a and epochs:
        lines.append(f"wrote {saved}")
    else:
        lines.append(f"wrote {saved}; train it with: leanconv train --from {saved} --data {data} --out RUN_DIR")
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _speed_line(timing: dict) -> str:
    parts = [f"batch {key[5:]}: {t['speedup']['median']:.2f}x ({t['speedup']['low']:.2f}-{t['speedup']['high']:.2f})"
             for key, t in timing.items() if key.startswith("batch")]
    return f"speed vs the original on {timing['runtime']} ({timing['threads']} thread(s)), side by side: " + \
        ", ".join(parts)
