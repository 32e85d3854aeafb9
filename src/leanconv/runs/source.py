"""What a run starts from: a trained model (a checkpoint file or a model in memory) and its data.

Every run works on fresh copies (:meth:`Source.fresh`), so the trained model is never
changed and ``compare`` can start each of its entries from the same weights. The data is
the one the model records (``leanconv_meta["dataset"]``) unless another is named; it must
have the model's input channels and classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from leanconv import checkpoint
from leanconv.data import load_dataset
from leanconv.data.datasets import dataset_takes, parse_dataset_name
from leanconv.data.splits import DatasetSplits
from leanconv.errors import LeanconvError
from leanconv.util.model_io import check_trainable

__all__ = ["Source", "recorded_data"]


def _fit_to(name: str, shape) -> dict[str, int]:
    """For a user's own images (which take ``size`` and ``channels``): the model's input side
    and channels, unless the name sets them."""
    if not shape:
        return {}
    canonical, given = parse_dataset_name(name)
    wanted = {"size": int(shape[-1]), "channels": int(shape[0])}
    return {k: v for k, v in wanted.items() if dataset_takes(canonical, k) and k not in given}


def recorded_data(meta: dict, data: str | None = None, data_dir: str | None = None) -> tuple[DatasetSplits, str | None]:
    """The dataset named by ``data``, else the one a model's ``leanconv_meta`` (``meta``) records,
    and the folder it was read from (``data_dir``, else the recorded folder when the dataset is
    the recorded one). Refuses data whose input channels or classes differ from the model's."""
    recorded = meta.get("dataset") or {}
    name = data or recorded.get("name")
    if name is None:
        raise LeanconvError("the model records no dataset; pass --data")
    folder = data_dir if data_dir is not None else (recorded.get("data_dir") if name == recorded.get("name") else None)
    shape, classes = meta.get("input_shape"), meta.get("num_classes")
    splits = load_dataset(name, folder, **_fit_to(name, shape))
    if shape and shape[0] != splits.in_channels:
        raise LeanconvError(f"the model takes {shape[0]} input channels but {splits.name} has {splits.in_channels}; "
                            "pass the --data it was trained on")
    if classes and classes != splits.num_classes:
        raise LeanconvError(f"the model predicts {classes} classes but {splits.name} has {splits.num_classes}; "
                            "pass the --data it was trained on")
    return splits, folder


@dataclass
class Source:
    """A trained model and its data. Give ``checkpoint`` (a leanconv file; ``constructor`` for
    a user model) or ``model`` (in memory; a run from it cannot be written as a command).
    ``data`` may be None only for runs that need none (converting an untrained zoo model)."""

    data: DatasetSplits | None
    checkpoint: Path | None = None
    model: nn.Module | None = None
    constructor: Any = None  # "package.module:function" or the function itself
    data_dir: str | None = None  # the folder the data was read from (None: the system copy)
    input_shape: tuple[int, int, int] | None = None  # overrides the shape the model records
    label: str | None = None  # how records name a model given in memory (e.g. the zoo name it was built from)
    words: tuple[str, ...] | None = None  # command-line words that rebuild a model given in memory

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise LeanconvError("a run starts from a checkpoint or a model: give exactly one")
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
            self._meta = checkpoint.read_header(self.checkpoint).get("meta", {})  # one line if not a checkpoint
        else:
            check_trainable(self.model, "the model")  # float16: refused before any work
            self._meta = getattr(self.model, "leanconv_meta", {})

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, data: str | None = None, data_dir: str | None = None,
                        constructor: str | None = None, input_shape: tuple[int, int, int] | None = None) -> "Source":
        """The checkpoint at ``path`` with the dataset it records (or ``data``); ``input_shape``
        for a checkpoint that records none."""
        header = checkpoint.read_header(path)
        base = header.get("base") or {}
        if isinstance(base, dict) and "constructor" in base and constructor is None:
            raise LeanconvError(f"{str(path)!r} was built from the user constructor {base['constructor']!r}; pass it "
                                "(constructor=... or --constructor)")
        meta = dict(header.get("meta", {}))
        if input_shape is not None:
            meta["input_shape"] = list(input_shape)
        splits, folder = recorded_data(meta, data, data_dir)
        return cls(splits, checkpoint=Path(path), constructor=constructor, data_dir=folder,
                   input_shape=None if input_shape is None else tuple(input_shape))

    @property
    def meta(self) -> dict[str, Any]:
        """The trained model's record (``leanconv_meta``)."""
        return self._meta

    @property
    def shape(self) -> tuple[int, int, int]:
        """The input shape (C, H, W): ``input_shape`` when given, else the one the model records."""
        shape = self.input_shape or self._meta.get("input_shape")
        if shape is None:
            raise LeanconvError("the model records no input shape; pass --input-shape C,H,W")
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    @property
    def resolution(self) -> int | None:
        """The side the loaders resize to for this model (None: the data's own side)."""
        side = self.shape[-1]
        return None if getattr(self.data, "image_size", None) in (None, side) else side

    def fresh(self) -> nn.Module:
        """A new copy of the trained model."""
        if self.checkpoint is not None:
            model = checkpoint.load(self.checkpoint, constructor=self.constructor)
            check_trainable(model, str(self.checkpoint))
            return model
        return copy.deepcopy(self.model)

    def writable(self) -> bool:
        """Whether a run from this source can be written as a command (:meth:`argv`)."""
        return self.checkpoint is not None or self.words is not None

    def argv(self) -> list[str]:
        """The checkpoint, constructor, input shape and data as command-line words."""
        if self.words is not None:
            return list(self.words)
        if self.checkpoint is None:
            raise LeanconvError("a run from a model in memory cannot be written as a command; save the model "
                                "with leanconv.save and start from the file")
        words = [str(self.checkpoint)]
        words += ["--constructor", checkpoint.constructor_name(self.constructor)] if self.constructor else []
        words += ["--input-shape", ",".join(map(str, self.input_shape))] if self.input_shape else []
        if self.data is not None:
            words += ["--data", self.data.name]
            words += ["--data-dir", str(self.data_dir)] if self.data_dir is not None else []
        return words

    def describe(self) -> str:
        """The checkpoint's path, else the label, else a note that the model was given in memory."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        return self.label or "<model in memory>"
