"""Swap a model's convolutions for DSXplore DW-SCC blocks or pSConv layers, in place.

Papers: Wang et al., "DSXplore: Optimizing Convolutional Neural Networks via Sliding-Channel
Convolutions" (IPDPS 2021), and Kundu et al., "Pre-defined Sparsity for Low-Complexity
Convolutional Neural Networks" (IEEE Trans. Computers 2020). The layers themselves live in
:mod:`leanconv.layers.sliding_channel` and :mod:`leanconv.layers.periodic_sparse`.

``to="scc"`` (DSXplore's placement rules):

* a ``k x k`` conv becomes ``nn.Sequential(depthwise k x k, SlidingChannelConv2d)``: the
  depthwise conv keeps the stride, padding and dilation and has ``groups = C_in`` and no
  bias; the SCC maps ``C_in -> C_out`` with windows of ``C_in / groups`` channels;
* a ``1 x 1`` conv becomes a :class:`SlidingChannelConv2d` directly (it is pointwise already);
* which convs: ResNet BasicBlocks (``resnet20..110``, ``resnet18``, ``preact_resnet*``): the
  ``conv2`` of every block; MobileNetV2: the expand and project 1x1 convs of every inverted
  residual block (the depthwise convs stay; the stem and the 1x1 head conv stay dense, like
  the classifier); anything else (VGG and user models): every dense (``groups == 1``) conv
  with a kernel larger than 1x1 except the first conv of the model, which sees the image.

``to="psconv"``: every dense 3x3 conv except the first conv of the model becomes a
:class:`PeriodicSparseConv2d` with the same channels, stride, padding and bias; 1x1 convs,
depthwise and grouped convs stay as they are (the patterns are defined for dense 3x3
kernels). The same rule serves zoo and user models.

"The first conv" is the first ``nn.Conv2d`` in ``model.named_modules()`` order, which is the
stem in every zoo model and in any model that registers its layers in forward order.

The new layers are freshly initialised (the papers train converted models from scratch);
every other weight is kept. ``leanconv train --from`` then trains all weights. To follow the
papers' protocol exactly, convert a zoo model name rather than a trained checkpoint. A bias
on a conv that becomes DW-SCC is dropped (SCC has none; zoo convs are followed by BatchNorm
and have no bias); a warning is logged.

The conversion is recorded in ``model.leanconv_meta["conversions"]`` (the ``test`` and
``train`` results of the unconverted model move into that entry as ``before``: they no longer
describe the model). :func:`leanconv.checkpoint.save` stores the swaps as ``replace`` edits,
so a converted checkpoint reloads exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PATTERNS, PeriodicSparseConv2d
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.models.mobilenetv2 import InvertedResidual
from leanconv.models.preact_resnet import PreActBlock
from leanconv.models.resnet_cifar import BasicBlock

__all__ = ["ConversionSpec", "CONVERSIONS", "convert", "conversion_spec", "conversion_targets", "replacement",
           "replacements"]

log = logging.getLogger(__name__)

CONVERSIONS = ("scc", "psconv")


@dataclass(frozen=True)
class ConversionSpec:
    """What to convert to: ``to="scc"`` with ``groups`` and ``overlap``, or ``to="psconv"`` with
    ``pattern`` (a key of :data:`leanconv.layers.PATTERNS`)."""

    to: str
    groups: int | None = None
    overlap: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.to == "scc":
            if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
                raise LeanconvError(f"SCC needs groups, a positive whole number; got {self.groups!r}")
            if not isinstance(self.overlap, (int, float)) or isinstance(self.overlap, bool) \
                    or not 0 <= self.overlap < 1:
                raise LeanconvError(f"SCC needs an overlap in [0, 1), got {self.overlap!r}")
            if self.pattern is not None:
                raise LeanconvError("a pattern applies to --to psconv only, not to scc")
        elif self.to == "psconv":
            if self.pattern not in PATTERNS:
                raise LeanconvError(f"unknown pSConv pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
            if self.groups is not None or self.overlap is not None:
                raise LeanconvError("groups and overlap apply to --to scc only, not to psconv")
        else:
            raise LeanconvError(f"unknown conversion {self.to!r}; choose one of {', '.join(CONVERSIONS)}")

    @property
    def name(self) -> str:
        """Short name for files and tables: ``scc_g2_o0.5`` or ``psconv_psd4_p8``."""
        if self.to == "scc":
            return f"scc_g{self.groups}_o{float(self.overlap):g}"
        return f"psconv_{self.pattern}"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _first_conv(model: nn.Module) -> str | None:
    convs = _convs(model)
    return convs[0][0] if convs else None


def conversion_spec(to: str, groups: int | None = None, overlap: float | None = None,
                    pattern: str | None = None) -> ConversionSpec:
    """The spec with the defaults filled in: overlap 0.5 for ``scc``, ``psd4_p8`` for ``psconv``."""
    if to == "scc" and overlap is None:
        overlap = 0.5
    if to == "psconv" and pattern is None:
        pattern = "psd4_p8"
    return ConversionSpec(to, groups, overlap, pattern)


def _plain(path: str, module: nn.Module) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise LeanconvError(f"layer {path} is a {type(module).__name__} (groups={getattr(module, 'groups', '-')}), "
                            "not a dense nn.Conv2d; convert a model whose convs are plain (it may be converted "
                            "already)")
    return module


def _zoo_scc_targets(model: nn.Module) -> list[str] | None:
    """DSXplore's placements for the block types of the zoo; None when the model has none."""
    blocks = [p for p, m in model.named_modules() if isinstance(m, (BasicBlock, PreActBlock))]
    inverted = [(p, m) for p, m in model.named_modules() if isinstance(m, InvertedResidual)]
    if not blocks and not inverted:
        return None
    paths = [f"{p}.conv2" if p else "conv2" for p in blocks]
    for path, block in inverted:
        for name, conv in block.conv.named_children():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1:
                paths.append(f"{path}.conv.{name}" if path else f"conv.{name}")
    return paths


def conversion_targets(model: nn.Module, to: str) -> list[str]:
    """Paths of the convs that :func:`convert` would replace for ``to`` (``"scc"`` or ``"psconv"``).

    Raises :class:`LeanconvError` when there is nothing to convert."""
    if to not in CONVERSIONS:
        raise LeanconvError(f"unknown conversion {to!r}; choose one of {', '.join(CONVERSIONS)}")
    first = _first_conv(model)
    if to == "scc":
        paths = _zoo_scc_targets(model)
        if paths is None:
            paths = [p for p, m in _convs(model) if p != first and m.groups == 1 and m.kernel_size != (1, 1)]
    else:
        paths = [p for p, m in _convs(model) if p != first and m.groups == 1 and m.kernel_size == (3, 3)]
    if not paths:
        what = "dense k x k convs" if to == "scc" else "dense 3x3 convs (depthwise ones cannot take the patterns)"
        raise LeanconvError(f"{type(model).__name__} has no {what} besides its first conv; nothing to convert to {to}")
    return paths


def _square(path: str, name: str, value: tuple[int, ...]) -> int:
    if len(set(value)) != 1:
        raise LeanconvError(f"layer {path}: {name}={value} is not square; leanconv cannot convert it")
    return value[0]


def _dw_scc(path: str, conv: nn.Conv2d, groups: int, overlap: float) -> nn.Module:
    cin, cout = conv.in_channels, conv.out_channels
    if cin % groups:
        raise LeanconvError(f"layer {path}: in_channels={cin} is not divisible by groups={groups}; choose groups "
                            "that divide the input channels of every converted layer")
    if conv.bias is not None:
        log.warning("layer %s: its bias is dropped (SCC has none)", path)
    if conv.kernel_size == (1, 1):
        if conv.padding not in ((0, 0), "valid"):
            raise LeanconvError(f"layer {path}: a padded 1x1 conv cannot become SCC")
        return SlidingChannelConv2d(cin, cout, groups, overlap, stride=_square(path, "stride", conv.stride))
    depthwise = nn.Conv2d(cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=cin,
                          bias=False, padding_mode=conv.padding_mode)
    nn.init.kaiming_normal_(depthwise.weight, mode="fan_out", nonlinearity="relu")  # the zoo's conv init
    return nn.Sequential(depthwise, SlidingChannelConv2d(cin, cout, groups, overlap))


def _psconv(path: str, conv: nn.Conv2d, pattern: str) -> PeriodicSparseConv2d:
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise LeanconvError(f"layer {path}: pSConv needs dilation 1, zero padding given as numbers; "
                            f"got dilation={conv.dilation}, padding={conv.padding!r}, mode={conv.padding_mode}")
    return PeriodicSparseConv2d(conv.in_channels, conv.out_channels, 3, _square(path, "stride", conv.stride),
                                _square(path, "padding", conv.padding), pattern=pattern, bias=conv.bias is not None)


def _replace(model: nn.Module, path: str, new: nn.Module, old: nn.Module) -> None:
    new.to(device=old.weight.device, dtype=old.weight.dtype).train(old.training)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def replacement(spec: ConversionSpec, path: str, conv: nn.Module) -> nn.Module:
    """The freshly initialised layer that replaces the conv ``conv`` at ``path`` (not placed)."""
    conv = _plain(path, conv)
    with torch.no_grad():
        if spec.to == "scc":
            return _dw_scc(path, conv, spec.groups, spec.overlap)
        return _psconv(path, conv, spec.pattern)


def replacements(model: nn.Module, spec: ConversionSpec, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Path -> new layer for every conv that :func:`convert` would replace (``model`` is not
    changed); ``layers`` restricts them to those paths, each of which must be a candidate."""
    paths = conversion_targets(model, spec.to)
    if layers is not None:
        layers = list(dict.fromkeys(layers))
        unknown = [p for p in layers if p not in paths]
        if unknown:
            raise LeanconvError(f"layer {unknown[0]!r} cannot be converted to {spec.to}; the layers that can are: "
                                f"{', '.join(paths)}")
        if not layers:
            raise LeanconvError("no layer named to convert; name at least one")
        paths = [p for p in paths if p in layers]
    return {path: replacement(spec, path, model.get_submodule(path)) for path in paths}


def convert(model: nn.Module, to: str = "scc", *, groups: int | None = None, overlap: float | None = None,
            pattern: str | None = None, layers: Sequence[str] | None = None) -> nn.Module:
    """Replace the convs that the rules in the module docstring pick, in place; returns ``model``.

    ``to="scc"``: ``groups`` (required) and ``overlap`` (default 0.5) of the sliding-channel
    convs. ``to="psconv"``: ``pattern`` (default ``psd4_p8``). ``layers``: convert only these
    paths (each must be one the rules pick; :func:`conversion_targets` lists them). Every
    replacement is checked before the model is touched, so an error (e.g. channels not
    divisible by ``groups``, naming the layer) leaves the model unchanged.
    """
    spec = conversion_spec(to, groups, overlap, pattern)
    new_layers = replacements(model, spec, layers)
    paths = list(new_layers)
    for path, new in new_layers.items():
        _replace(model, path, new, model.get_submodule(path))
    meta = dict(getattr(model, "leanconv_meta", None) or {})
    stale = {key: meta.pop(key) for key in ("test", "train") if key in meta}  # results of the unconverted model
    entry = {**spec.to_dict(), "layers": paths, **({"before": stale} if stale else {})}
    meta["conversions"] = [*meta.get("conversions", []), entry]
    model.leanconv_meta = meta
    log.info("converted %d layers to %s", len(paths), spec.name)
    return model
