"""``leanconv convert MODEL_OR_CKPT``: swap convs for DSXplore DW-SCC blocks or pSConv layers.

The placement rules are those of :mod:`leanconv.convs.convert`. The new layers are freshly
initialised and every other weight is kept; ``leanconv train --from DIR/model.safetensors``
then trains the whole model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from leanconv import checkpoint
from leanconv.util.files import write_json
from leanconv.cli.common import add_model_args, load_data, load_model, parse_shape, positive_int
from leanconv.convs.convert import CONVERSIONS, ConversionSpec, convert
from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PATTERNS
from leanconv.models import names

__all__ = ["register", "run", "spec_from_args"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="swap convs for DW + sliding-channel (SCC) or periodic sparse (pSConv) layers",
                       description="Convert a zoo model or a checkpoint: --to scc turns the convs DSXplore picks "
                       "(ResNet: conv2 of every block; VGG: every 3x3 but the first; MobileNetV2: the 1x1 expand "
                       "and project convs) into depthwise + sliding-channel convs; --to psconv turns every dense "
                       "3x3 conv but the first into a periodic sparse conv. New layers are freshly initialised, "
                       "other weights kept. Writes DIR/model.safetensors and DIR/convert.json and prints the "
                       "counted params and MACs before and after. Train the result with "
                       "'leanconv train --from DIR/model.safetensors'.")
    p.add_argument("source", metavar="MODEL_OR_CKPT", help=f"a checkpoint or a zoo model ({', '.join(names())})")
    p.add_argument("--to", required=True, choices=CONVERSIONS, help="target layer type")
    p.add_argument("--groups", type=positive_int, default=None, metavar="G",
                   help="scc: channel groups; each output reads C_in/G input channels (required for scc)")
    p.add_argument("--overlap", type=float, default=None, metavar="O",
                   help="scc: overlap of neighbouring windows in [0, 1) (default: 0.5)")
    p.add_argument("--pattern", default=None, choices=sorted(PATTERNS), help="psconv: kernel pattern (default: psd4_p8)")
    p.add_argument("--data", default=None, help="zoo names only: dataset whose input shape and classes the model "
                   "takes, recorded in the checkpoint (fashion-mnist, cifar10, cifar100, synthetic)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the system copy)")
    p.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                   help="zoo names only: input shape (default: the dataset's, else 3,32,32)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="zoo names only: classes (default: the dataset's, else 10)")
    add_model_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the new layers' initialisation (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=run, out_is_folder=True)


def spec_from_args(args: argparse.Namespace) -> ConversionSpec:
    """The conversion asked for, with the defaults filled in; mismatched options are errors."""
    if args.to == "scc":
        if args.groups is None:
            raise LeanconvError("--to scc needs --groups G (e.g. --groups 2)")
        if args.pattern is not None:
            raise LeanconvError("--pattern applies to --to psconv only")
        return ConversionSpec("scc", args.groups, 0.5 if args.overlap is None else args.overlap)
    if args.groups is not None or args.overlap is not None:
        raise LeanconvError("--groups and --overlap apply to --to scc only")
    return ConversionSpec("psconv", pattern=args.pattern or "psd4_p8")


def _zoo_model(args: argparse.Namespace) -> torch.nn.Module:
    shape, classes, dataset = args.input_shape, args.num_classes, None
    if args.data is not None:
        data = load_data(args.data, args.data_dir)
        if shape is not None and shape[0] != data.in_channels:
            raise LeanconvError(f"--input-shape has {shape[0]} channels but {data.name} has {data.in_channels}")
        if classes is not None and classes != data.num_classes:
            raise LeanconvError(f"--num-classes {classes} disagrees with {data.name}, which has {data.num_classes}")
        shape = shape or (data.in_channels, data.image_size, data.image_size)
        classes = data.num_classes
        dataset = {"name": data.name, "data_dir": args.data_dir}
    model = load_model(args.source, input_shape=shape or (3, 32, 32), num_classes=classes or 10)
    if dataset is not None:
        model.leanconv_meta["dataset"] = dataset
    return model


def _source_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.source in names() and not Path(args.source).exists():
        return _zoo_model(args)
    given = [flag for flag, value in (("--data", args.data), ("--input-shape", args.input_shape),
                                      ("--num-classes", args.num_classes)) if value is not None]
    if given:
        raise LeanconvError(f"{', '.join(given)} apply to zoo model names only; a checkpoint keeps the dataset and "
                            "input shape it records")
    return load_model(args.source, constructor=args.constructor)


def _cost(model: torch.nn.Module, shape: list[int]) -> dict:
    report = count(model, shape)
    return {"params": report.params, "macs": report.macs, "flops": report.flops}


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    torch.manual_seed(args.seed)
    model = _source_model(args)
    shape = model.leanconv_meta.get("input_shape") or [3, 32, 32]
    before = _cost(model, shape)
    convert(model, spec.to, groups=spec.groups, overlap=spec.overlap, pattern=spec.pattern)
    after = _cost(model, shape)
    out = Path(args.out)
    checkpoint.save(model, out / "model.safetensors", constructor=args.constructor)
    record = {"command": "convert", "source": args.source, "conversion": spec.to_dict(), "name": spec.name,
              "layers": model.leanconv_meta["conversions"][-1]["layers"], "input_shape": list(shape),
              "before": before, "after": after, "model": str(out / "model.safetensors"),
              "args": {k: v for k, v in vars(args).items() if k != "func"}}
    write_json(out / "convert.json", record)
    print(json.dumps(record) if args.json else _summary(record, model))
    return 0


def _summary(record: dict, model: torch.nn.Module) -> str:
    b, a = record["before"], record["after"]
    data = (model.leanconv_meta.get("dataset") or {}).get("name", "DATA")
    return "\n".join([
        f"converted {len(record['layers'])} layers to {record['name']} (input {','.join(map(str, record['input_shape']))})",
        f"{'':8}{'params':>12}{'MACs':>14}",
        f"{'before':8}{b['params']:>12,}{b['macs'] / 1e6:>12.2f} M",
        f"{'after':8}{a['params']:>12,}{a['macs'] / 1e6:>12.2f} M",
        f"{'ratio':8}{a['params'] / b['params']:>12.3f}{a['macs'] / b['macs']:>14.3f}",
        f"wrote {record['model']}; train it with: leanconv train --from {record['model']} --data {data} --out RUN_DIR",
    ])
