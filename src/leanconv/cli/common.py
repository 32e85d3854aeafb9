"""Pieces shared by the subcommands: model and data arguments, progress bars, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from leanconv import checkpoint
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.models import build, names
from leanconv.util.fileset import check_replaceable
from leanconv.util.model_io import check_trainable, output_classes
from leanconv.runs.source import Source, recorded_data

__all__ = [
    "describe", "add_checkpoint_args", "add_build_args", "parse_kwargs", "add_data_args", "add_model_args", "add_seed_arg", "add_repeats_arg", "add_output_args",
    "add_config_options", "build_config", "source_from_args", "load_model", "data_from_meta", "recorded_data_dir",
    "input_shape_of", "resolution_of", "parse_shape", "positive_int", "positive_float", "non_negative_float",
    "check_out_folder", "check_out_file", "progress_bar",
]

DEFAULT_DATA = "fashion-mnist"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _finite_float(text: str, ok: Callable[[float], bool], must: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number {must}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates)."""
    return _finite_float(text, lambda v: v > 0, "above 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay)."""
    return _finite_float(text, lambda v: v >= 0, ">= 0")


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"input shape must be three positive numbers C,H,W, got {text!r}")
    return shape  # type: ignore[return-value]


def describe(doc: str, **fields: str) -> str:
    """A subcommand's ``--help`` description: its module docstring's second paragraph (the
    first line names the command; later paragraphs are notes for developers), with
    ``{name}`` placeholders filled from ``fields``."""
    paragraphs = [p.strip() for p in doc.split("\n\n")]
    text = " ".join(paragraphs[1].split()) if len(paragraphs) > 1 else paragraphs[0]
    return text.format(**fields) if fields else text


def add_data_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_DATA, default_help: str = "",
                  batch_size: bool = True) -> None:
    """``--data``, ``--data-dir`` and (where the command uses it) ``--batch-size``."""
    helptext = "dataset: fashion-mnist, cifar10, cifar100, synthetic, imagefolder:PATH, npz:PATH"
    if default_help:
        helptext += f" (default: {default_help})"
    elif default is None:
        helptext += " (default: the one the checkpoint was trained on)"
    else:
        helptext += f" (default: {default})"
    parser.add_argument("--data", default=default, help=helptext)
    parser.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the system copy)")
    if batch_size:
        parser.add_argument("--batch-size", type=positive_int, default=128, help="images per batch (default: 128)")


def add_model_args(parser: argparse.ArgumentParser, input_shape: bool = False) -> None:
    """``--constructor`` (and, for a checkpoint that may record no input shape, ``--input-shape``)."""
    parser.add_argument("--constructor", default=None, metavar="PKG.MODULE:FN",
                        help="the user model constructor a checkpoint was built from (never imported unless named "
                        "here)")
    if input_shape:
        parser.add_argument("--input-shape", type=parse_shape, default=None, metavar="C,H,W",
                            help="one input image's shape, for a checkpoint that records none")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``CKPT`` (a trained checkpoint), ``--constructor`` and ``--input-shape``."""
    parser.add_argument("ckpt", metavar="CKPT", help="a trained leanconv checkpoint (.safetensors)")
    add_model_args(parser, input_shape=True)


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_repeats_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs per latency figure (default: 10)")


def add_output_args(parser: argparse.ArgumentParser, out_help: str = "output folder",
                    progress_help: str = "no progress bars") -> None:
    """``--out DIR`` (required) and ``--no-progress``, the last arguments of a run that writes a folder."""
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    parser.add_argument("--no-progress", action="store_true", help=progress_help)
    parser.set_defaults(out_is_folder=True)  # main() checks it before any work


# The names leanconv writes into an --out folder (file sets, logs, reports), checked before any work.
OUTPUT_NAMES = ("model.safetensors", "train_state.safetensors", "origin.safetensors", "record.json", "convert.json",
                "sensitivity.json", "sensitivity.png", "config.json", "metrics.jsonl", "results.jsonl", "samples.jsonl",
                "explore.json", "table.md", "pareto.png", "budget.png", "channels.png", "surface.png", "report.md",
                "report.html", "model.onnx")


def check_out_file(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output file path that is a folder or where no file can be
    written. Creates nothing."""
    if Path(path).is_dir():
        raise LeanconvError(f"{option} {str(path)!r} is a folder; name the file to write")
    check_replaceable(path, option)
    _check_writable(Path(path).absolute().parent, path, option)


def check_out_folder(path: str | Path) -> None:
    """Refuse, before any work, an ``--out`` folder that cannot be written: the path or one of its
    parents is a file, or the nearest existing folder is read-only. Creates nothing."""
    if Path(path).exists() and not Path(path).is_dir():
        raise LeanconvError(f"--out {str(path)!r} is a file, not a folder; name a folder (it will be created)")
    _check_writable(Path(path).absolute(), path, "--out")
    for name in OUTPUT_NAMES:
        check_replaceable(Path(path) / name)


def _check_writable(p: Path, path: str | Path, option: str) -> None:
    """The nearest existing folder at or above ``p`` must be a writable folder."""
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise LeanconvError(f"{option} {str(path)!r} lies under {str(existing)!r}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LeanconvError(f"cannot write to {str(existing)!r} for {option} {str(path)!r}; pick a writable folder")


def load_model(spec: str, *, constructor: str | None = None, input_shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A checkpoint path, a zoo model name or ``PKG.MODULE:FN`` -> model (a model built from a
    name is freshly initialised; ``kwargs`` go to a user's constructor as given)."""
    path = Path(spec)
    if os.path.lexists(path) or spec.endswith(".safetensors"):  # a link loop or a FIFO is a file meant too
        return checkpoint.load(path, constructor=constructor)
    if spec not in names() and ":" not in spec:
        raise LeanconvError(f"{spec!r} is neither a checkpoint file nor a zoo model (nor PKG.MODULE:FN); zoo models: "
                            f"{', '.join(names())}")
    shape = input_shape or (3, 32, 32)
    zoo: dict[str, Any] = {"in_channels": shape[0], "input_size": shape[1]}
    if num_classes is not None:
        zoo["num_classes"] = num_classes
    model = build(spec, kwargs, **zoo)
    model.leanconv_meta = {"input_shape": list(shape), "num_classes": output_classes(model, shape)}
    return model


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """``--arg KEY=VALUE``: keyword arguments of a user's constructor named by PKG.MODULE:FN."""
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword argument of PKG.MODULE:FN (repeatable; VALUE as JSON, else text)")


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``--arg`` values as keyword arguments."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.isidentifier():
            raise LeanconvError(f"--arg takes KEY=VALUE with KEY a Python name, got {pair!r}")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text
    return kwargs


def input_shape_of(model: nn.Module, override: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """The input shape to use with ``model``: an override, else the one in its record."""
    if override is not None:
        return override
    shape = getattr(model, "leanconv_meta", {}).get("input_shape")
    if shape is None:
        raise LeanconvError("the model records no input shape; pass --input-shape C,H,W")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def resolution_of(model: nn.Module, data: DatasetSplits) -> int | None:
    """The side the loaders must resize to for ``model`` (None when it is the data's own)."""
    shape = getattr(model, "leanconv_meta", {}).get("input_shape")
    if shape is None or int(shape[-1]) == data.image_size:
        return None
    return int(shape[-1])


def recorded_data_dir(recorded: dict, args: argparse.Namespace) -> str | None:
    """The data folder to load from: ``--data-dir`` when given, else the folder a model's
    ``leanconv_meta`` (``recorded``) names when ``--data`` is absent or the recorded dataset."""
    meta = recorded.get("dataset") or {}
    if args.data_dir is not None:
        return args.data_dir
    return meta.get("data_dir") if (args.data or meta.get("name")) == meta.get("name") else None


def data_from_meta(model: nn.Module, args: argparse.Namespace) -> DatasetSplits:
    """The dataset given on the command line, else the one the model was trained on; it must
    have the model's input channels and classes (where the model records them)."""
    return recorded_data(getattr(model, "leanconv_meta", {}), args.data, args.data_dir)[0]


def source_from_args(args: argparse.Namespace, ckpt: str) -> Source:
    """The checkpoint ``ckpt`` with ``--data``/``--data-dir`` (default: the recorded ones) and
    ``--constructor``, as a run's :class:`~leanconv.runs.source.Source`; checked before any work
    (the file, its constructor, the data's fit)."""
    if Path(ckpt).is_dir():
        raise LeanconvError(f"checkpoint {ckpt!r} is a folder; name the .safetensors file")
    constructor = getattr(args, "constructor", None)
    check_trainable(checkpoint.load(ckpt, constructor=constructor), ckpt)  # a corrupt file or float16: one line, now
    return Source.from_checkpoint(ckpt, data=args.data, data_dir=args.data_dir, constructor=constructor,
                                  input_shape=getattr(args, "input_shape", None))


# ---------------------------------------------------------------- options built from run configs


def _parser_for(f: dataclasses.Field) -> Callable[[str], Any] | None:
    parse = f.metadata.get("parse")
    if parse is not None:
        return _syntax(parse, f.metadata.get("expects") or "a value")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if kind.startswith("int"):
        return _syntax(int, "a whole number")
    if kind.startswith("float"):
        return _syntax(float, "a number")
    return None


def _syntax(parse: Callable[[str], Any], what: str = "a value") -> Callable[[str], Any]:
    """An argparse type: ``parse(text)``, a ValueError being one line naming what was expected."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_config_options(parser: argparse.ArgumentParser, config_type: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add an option for every field of the run config ``config_type`` that has one (its flag,
    help, default, choices from the field's metadata; :mod:`leanconv.runs.config`). Values are
    parsed here and checked when the config is built (:func:`config_from_args`)."""
    for f in dataclasses.fields(config_type):
        meta = f.metadata
        if not meta.get("flag") or not meta.get("cli", True) or f.name in skip or callable(meta.get("flag")):
            continue
        default = f.default
        text = meta.get("help") or ""
        names = [meta["flag"], *meta.get("aliases", ())]
        if isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, action="store_false" if default else "store_true", help=text)
            continue
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if default is not None:
            text += f" (default: {shown})" if "default:" not in text else ""
        parser.add_argument(*names, dest=f.name, default=default, type=_parser_for(f), choices=choices,
                            metavar=meta.get("metavar"), help=text)


def build_config(config_type: type, args: argparse.Namespace, **given: Any) -> Any:
    """The run config of ``config_type`` from the parsed options (and ``given`` values); a bad
    value is one :class:`LeanconvError` naming its option."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if hasattr(args, f.name)}
    return config_type(**{**values, **given})


def progress_bar(desc: str, enabled: bool = True) -> tuple[Callable[[int, int, dict], None], Callable[[], None]]:
    """A ``progress(done, total, info)`` callback drawing a tqdm bar on stderr, and a closer."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def update(done: int, total: int, info: dict) -> None:
        if not enabled:
            return
        bar = state["bar"]
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr,
                                      dynamic_ncols=True, leave=True)
        bar.n = done
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}, refresh=False)
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    return update, close
