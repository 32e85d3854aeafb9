"""Pieces shared by the subcommands: model and data arguments, progress bars, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from leanconv import checkpoint
from leanconv.data.datasets import check_dataset_spec
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.models import build, names
from leanconv.util import checks
from leanconv.util.fileset import check_replaceable, check_set_folder
from leanconv.util.limits import (MAX_BATCH, MAX_CLASSES, MAX_EPOCHS, MAX_IMAGES, MAX_INPUT_CHANNELS,
                                  MAX_INPUT_VALUES, MAX_LIST, MAX_LR, MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_REPEATS,
                                  MAX_SIDE, MAX_THREADS, SEED_MAX)
from leanconv.util.model_io import check_trainable, output_classes
from leanconv.runs.source import Source, recorded_data

__all__ = [
    "describe", "add_checkpoint_args", "add_build_args", "parse_kwargs", "add_data_args", "add_model_args", "add_seed_arg", "add_repeats_arg", "add_output_args",
    "add_config_options", "list_arg", "build_config", "source_from_args", "load_model", "data_from_meta", "recorded_data_dir",
    "input_shape_of", "resolution_of", "parse_shape", "whole_in", "number_in", "whole_number", "positive_int",
    "batch_size_arg", "epochs_arg", "seed_arg", "repeats_arg", "threads_arg", "workers_arg", "classes_arg", "side_arg",
    "positive_float", "non_negative_float", "check_data_spec", "list_of", "check_path_text", "check_out_folder",
    "check_out_file", "progress_bar",
]

DEFAULT_DATA = "fashion-mnist"


def whole_in(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]`` (ranges: :mod:`leanconv.util.limits`)."""
    def convert(text: str) -> int:
        try:
            value = int(text)  # also refuses more than 4,300 digits
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number in [{low}, {high}]{why}, got "
                                             f"{checks.brief(text)}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number in [{low}, {high}]{why}, got "
                                             f"{checks.brief(value)}")
        return value
    convert.__name__ = "whole number"
    return convert


def number_in(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
              at_most: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number within the given bounds."""
    limits = {"above": above, "at_least": at_least, "below": below, "at_most": at_most}

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {checks.bounds(**limits)}, got "
                                             f"{checks.brief(text)}") from None
        if not checks.within(value, **limits):
            raise argparse.ArgumentTypeError(f"must be a finite number {checks.bounds(**limits)}, got "
                                             f"{checks.brief(text)}")
        return value
    convert.__name__ = "number"
    return convert


# The numeric options the commands declare themselves (run configs check their own: runs/config.py).
whole_number = whole_in(-(2**63), 2**63 - 1)  # syntax only: the command checks the range
positive_int = whole_in(1, MAX_IMAGES)  # a count of images
batch_size_arg = whole_in(1, MAX_BATCH)
epochs_arg = whole_in(1, MAX_EPOCHS)
seed_arg = whole_in(0, SEED_MAX)
repeats_arg = whole_in(1, MAX_REPEATS)
threads_arg = whole_in(1, MAX_THREADS)
workers_arg = whole_in(0, MAX_THREADS)
classes_arg = whole_in(1, MAX_CLASSES)
side_arg = whole_in(1, MAX_SIDE)
positive_float = number_in(above=0, at_most=MAX_LR)  # learning rates
non_negative_float = number_in(at_least=0, at_most=MAX_LR)  # weight decay


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``: channels in [1, 256], sides in [1, 1024], at most
    3 * 1024 * 1024 values (:mod:`leanconv.util.limits`)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like C,H,W (e.g. 3,32,32), got {checks.brief(text)}") \
            from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"input shape must be three whole numbers C,H,W, got {checks.brief(text)}")
    c, h, w = shape
    if not (1 <= c <= MAX_INPUT_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE) or c * h * w > MAX_INPUT_VALUES:
        raise argparse.ArgumentTypeError(f"input shape C,H,W needs C in [1, {MAX_INPUT_CHANNELS}], H and W in "
                                         f"[1, {MAX_SIDE}] and C * H * W <= {MAX_INPUT_VALUES}, got "
                                         f"{checks.brief(text)}")
    return shape  # type: ignore[return-value]


def list_of(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse type: comma-separated values, each read by the argparse type ``item``; at most
    ``MAX_LIST`` of them."""
    def convert(text: str) -> tuple:
        words = [w.strip() for w in text.split(",") if w.strip()]
        if len(words) > MAX_LIST:
            raise argparse.ArgumentTypeError(f"takes at most {MAX_LIST} values, got {len(words)}")
        return tuple(item(w) for w in words)
    convert.__name__ = "list"
    return convert


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
        parser.add_argument("--batch-size", type=batch_size_arg, default=128,
                            help=f"images per batch, 1 to {MAX_BATCH} (default: 128)")


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
    parser.add_argument("--seed", type=seed_arg, default=0, help=f"random seed, 0 to {SEED_MAX} (default: 0)")


def add_repeats_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=repeats_arg, default=10,
                        help=f"timed runs per latency figure, 1 to {MAX_REPEATS} (default: 10)")


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


def check_path_text(path: str | Path, option: str) -> None:
    """Refuse a path that names nothing any file system could hold: empty, with a NUL, longer
    than ``MAX_PATH_BYTES`` or with a name longer than ``MAX_NAME_BYTES`` (the file system
    would refuse it later, after work, as an ``OSError``)."""
    text = os.fspath(path)
    if not text:
        raise LeanconvError(f"{option} is empty")
    raw = os.fsencode(text) if "\0" not in text else b""
    if not raw or len(raw) > MAX_PATH_BYTES or any(len(name) > MAX_NAME_BYTES for name in raw.split(b"/")):
        raise LeanconvError(f"{option} {checks.brief(text)} is no path: at most {MAX_PATH_BYTES} bytes, "
                            f"{MAX_NAME_BYTES} a name, and no NUL")


def check_data_spec(spec: str, option: str = "--data") -> None:
    """Refuse, before any work, a dataset spec with an unknown name or option or an option out of
    its range (nothing is loaded: the files are read, and checked, by the command)."""
    try:
        check_dataset_spec(spec)
    except LeanconvError as exc:
        raise LeanconvError(f"{option}: {exc}") from None


def check_out_file(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output file path that is a folder or where no file can be
    written. Creates nothing."""
    check_path_text(path, option)
    if Path(path).is_dir():
        raise LeanconvError(f"{option} {str(path)!r} is a folder; name the file to write")
    _check_writable(Path(path).absolute().parent, path, option)
    check_replaceable(path, option)


def check_out_folder(path: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder (``--out``) that cannot be written: the path or
    one of its parents is a file, or the nearest existing folder is read-only. Creates nothing."""
    check_path_text(path, option)
    if Path(path).exists() and not Path(path).is_dir():
        raise LeanconvError(f"{option} {str(path)!r} is a file, not a folder; name a folder (it will be created)")
    _check_writable(Path(path).absolute(), path, option)
    check_set_folder(Path(path))
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
        raise LeanconvError(f"{checks.brief(spec)} is neither a checkpoint file nor a zoo model (nor PKG.MODULE:FN); "
                            "zoo models: "
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
    """``--arg`` values as keyword arguments: a VALUE that is JSON as its value, else as text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.isidentifier():
            raise LeanconvError(f"--arg takes KEY=VALUE with KEY a Python name, got {checks.brief(pair)}")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text
        except (ValueError, RecursionError):  # a number of more than 4,300 digits, or nesting too deep
            raise LeanconvError(f"--arg {key}: its value is JSON leanconv will not read (a number of more than "
                                f"4,300 digits, or lists nested too deeply), got {checks.brief(text)}") from None
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
    """An argparse type: ``parse(text)``, a ValueError being one line naming what was expected;
    a list holds at most ``MAX_LIST`` values."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {checks.brief(text)}") from None
        if isinstance(value, (tuple, list)) and len(value) > MAX_LIST:
            raise argparse.ArgumentTypeError(f"takes at most {MAX_LIST} values, got {len(value)}")
        return value
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def list_arg(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse type for a comma-separated option the command declares itself (as a config
    field's option is parsed): one line naming what was expected, at most ``MAX_LIST`` values."""
    return _syntax(parse, what)


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
    """A ``progress(done, total, info)`` callback drawing a tqdm bar on stderr, and a closer.
    The bar is labelled ``desc``, followed by the info's ``stage`` where it names one (a new
    bar starts when the stage or the total changes)."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None, "label": None}

    def update(done: int, total: int, info: dict) -> None:
        if not enabled:
            return
        bar, stage = state["bar"], info.get("stage")
        label = f"{desc}: {stage}" if stage else desc
        if bar is None or bar.total != total or state["label"] != label:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=label, unit="step", file=sys.stderr,
                                      dynamic_ncols=True, leave=True)
            state["label"] = label
        bar.n = done
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items() if k != "stage"},
                        refresh=False)
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    return update, close
