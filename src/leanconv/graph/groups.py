"""Channel groups: which channels of a network must be removed together.

Built on torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural
Pruning", CVPR 2023), which traces one forward pass and links every layer whose channels
are tied to another's: a conv's filters, its BatchNorm, the input columns of its
consumers, the other convs summed with it by a residual add, the depthwise conv that
filters its channels, and the slice of a concatenation it feeds. torch-pruning returns
one group per coupled set; we translate each into a
:class:`~leanconv.graph.types.ChannelGroup` (module paths, ``"out"``/``"in"`` kinds,
indices aligned to the root layer's output channels).

What is never a group: the outputs of the network's final layer (the classifier), any
channel space fed by the network input, and a layer listed in ``ignored``.

What we refuse instead of pruning wrongly (:class:`~leanconv.errors.LeanconvError` naming
the layer, or, with ``strict=False``, a logged exclusion of the affected groups):

* a layer with parameters that torch-pruning cannot resize correctly (anything but
  ``Conv2d``, ``Linear``, ``BatchNorm1d/2d`` and leanconv's ``ImplantConv2d``), including
  parameters used directly in ``forward``;
* a tensor operation on the channel path that might move channels (``roll``, ``gather``,
  ``permute``, a reduction over channels...): only ops known to act per channel pass;
* a split, slice or unbind of the channel dimension (torch-pruning's split bookkeeping is
  not reliable when several groups are pruned in turn).

Grouped convs (``1 < groups < channels``) keep every conv group the same width: group
channels that land at the same position inside each conv group form one *unit*
(:func:`channel_units`) that is removed as a whole. A depthwise conv with a channel
multiplier cannot lose input channels at all, so its producer's group is one unit (kept).

The output channels of an ``ImplantConv2d`` are frozen (its producers stay prunable): an
implant is the last step of a HAP schedule.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from leanconv.errors import LeanconvError
from leanconv.graph.types import ChannelGroup, Member
from leanconv.layers.implant import ImplantConv2d
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode

__all__ = ["LayerShare", "TracedGroup", "channel_groups", "trace_groups", "channel_units", "build_graph"]

log = logging.getLogger(__name__)

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, ImplantConv2d)
# Autograd ops that act on each channel separately (names without the trailing version digit).
_CHANNELWISE_OPS = {
    "AddBackward", "SubBackward", "MulBackward", "DivBackward", "NegBackward", "ReluBackward",
    "HardtanhBackward", "SigmoidBackward", "SiluBackward", "GeluBackward", "TanhBackward",
    "HardswishBackward", "HardsigmoidBackward", "LeakyReluBackward", "EluBackward", "ThresholdBackward",
    "ClampBackward", "ClampMinBackward", "ClampMaxBackward", "SoftplusBackward", "MishBackward",
    "PowBackward", "SqrtBackward", "RsqrtBackward", "ExpBackward", "AbsBackward", "CloneBackward",
    "AliasBackward", "ToCopyBackward", "NativeDropoutBackward", "MaxPool2DWithIndicesBackward",
    "AvgPool2DBackward", "AdaptiveAvgPool2DBackward", "AdaptiveMaxPool2DBackward",
    "UpsampleNearest2DBackward", "UpsampleBilinear2DBackward", "ConstantPadNdBackward",
    "ReflectionPad2DBackward", "ReplicationPad2DBackward",
}
_REDUCTIONS = {"MeanBackward", "SumBackward", "AmaxBackward", "AminBackward"}


@dataclass(frozen=True)
class LayerShare:
    """How one module (``kind`` ``"out"`` or ``"in"``) loses channels with a group: removing
    group channel ``k`` removes ``counts[k]`` of its channels (1 normally; ``H*W`` for a linear
    layer after a flatten). Covers every module torch-pruning resizes, unlike the members."""

    module: str
    kind: str
    counts: tuple[int, ...]


@dataclass(frozen=True)
class TracedGroup:
    """A :class:`ChannelGroup` plus what the budget search needs: its units (lists of group
    channels removed together) and every resized module's share."""

    group: ChannelGroup
    units: tuple[tuple[int, ...], ...]
    shares: tuple[LayerShare, ...]


class _ImplantPruner(tp.pruner.BasePruningFunc):
    """Teaches torch-pruning to drop *input* channels of an ImplantConv2d (both inner convs)."""

    TARGET_MODULES = (ImplantConv2d,)

    def prune_in_channels(self, layer: ImplantConv2d, idxs: Sequence[int]) -> nn.Module:
        for conv in (layer.conv, layer.implant):
            tp.prune_conv_in_channels(conv, sorted(idxs))
        return layer

    def prune_out_channels(self, layer: ImplantConv2d, idxs: Sequence[int]) -> nn.Module:
        raise LeanconvError("output channels of an implanted conv cannot be pruned; prune before implanting")

    def get_out_channels(self, layer: ImplantConv2d) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ImplantConv2d) -> int:
        return layer.in_channels


def _as_one_conv(layer: ImplantConv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        weight, bias = layer.dense_weight()
    return layer.conv._conv_forward(x, weight, bias)


@contextmanager
def _implants_as_single_ops(model: nn.Module) -> Iterator[None]:
    """While tracing, run every ImplantConv2d as one conv with its (detached) equivalent dense
    weight: torch-pruning then sees one layer node, not the convs, cat and gather inside it."""
    implants = [m for m in model.modules() if isinstance(m, ImplantConv2d)]
    for m in implants:
        m.forward = functools.partial(_as_one_conv, m)
    try:
        yield
    finally:
        for m in implants:
            del m.forward


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_input`` (in eval mode) into torch-pruning's dependency
    graph; ``dg.leanconv_output_shape`` holds the output's shape. Module train/eval modes and
    ``requires_grad`` flags are left as they were."""
    x = to_model(example_input.detach(), model).clone().requires_grad_(True)
    outputs = []

    def forward(net: nn.Module, inputs: torch.Tensor):
        out = net(inputs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return out

    try:
        with eval_mode(model), torch.enable_grad(), _implants_as_single_ops(model):
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=x, forward_fn=forward, verbose=False,
                customized_pruners={ImplantConv2d: _ImplantPruner()},
            )
    except LeanconvError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise LeanconvError(f"cannot trace the model on an input of shape {tuple(x.shape)}: {exc}") from exc
    except (ArithmeticError, IndexError, KeyError, AttributeError) as exc:  # inside torch-pruning's index mapping
        raise LeanconvError(f"the dependency graph cannot follow this model's channels through "
                            f"{_failing_step(exc)} ({type(exc).__name__}); leanconv cannot prune it") from exc
    dg.leanconv_output_shape = tuple(outputs[0].shape)
    dg.leanconv_activation_ops, dg.leanconv_input_readers = _activation_ops(outputs[0].grad_fn, x)
    return dg


def _failing_step(exc: BaseException) -> str:
    """What torch-pruning was mapping when it failed, from the innermost frame of its traceback."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    where = next((f for f in reversed(frames) if f.startswith("update_") and f.endswith("_index_mapping")), "")
    if "reshape" in where:
        return "a reshape of the channel dimension (view or reshape, e.g. a channel shuffle)"
    if "concat" in where or "split" in where:
        return f"a channel {'concatenation' if 'concat' in where else 'split'} it cannot map"
    return f"an operation it cannot map ({where or (frames[-1] if frames else 'unknown')})"


def _activation_ops(root, x: torch.Tensor) -> tuple[set[int], set[int]]:
    """ids of the autograd nodes that depend on the network input ``x`` (the activation path,
    as opposed to ops on weights), and of those that read ``x`` itself."""
    depends: dict[int, bool] = {}
    readers: set[int] = set()
    stack = [(root, False)] if root is not None else []
    while stack:
        fn, expanded = stack.pop()
        if id(fn) in depends:
            continue
        children = [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
        if not expanded:
            stack.append((fn, True))
            stack.extend((c, False) for c in children if id(c) not in depends)
            continue
        reads_x = any(getattr(c, "variable", None) is x for c in children)
        if reads_x:
            readers.add(id(fn))
        depends[id(fn)] = reads_x or any(depends.get(id(c), False) for c in children)
    return {k for k, v in depends.items() if v}, readers


def _op_problem(dg: tp.DependencyGraph, node) -> str | None:
    """Why a dummy op node on a group's path is unsafe, or None (ops on weights are ignored)."""
    kind = node.type
    if id(node.grad_fn) not in dg.leanconv_activation_ops:
        return None
    if kind in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND):
        return f"a {kind.name.lower()} of the channel dimension"
    if id(node.grad_fn) in dg.leanconv_input_readers and kind in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.CONCAT):
        return "a tensor operation that reads the network input"
    if kind != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
        return None
    name = node.grad_fn.name().rstrip("0123456789")
    if name in _REDUCTIONS:
        dims = getattr(node.grad_fn, "_saved_dim", None)
        ndim = len(getattr(node.grad_fn, "_saved_self_sym_sizes", ()) or ())
        if dims is not None and ndim and 1 not in {d % ndim for d in dims}:
            return None
        return f"operation {name} over the channel dimension"
    if name in _CHANNELWISE_OPS:
        return None
    return f"operation {name}, which leanconv cannot follow channel by channel"


def _problem(dg: tp.DependencyGraph, item) -> str | None:
    """Why a torch-pruning group item makes its group unprunable, or None."""
    target = item.dep.target
    module = target.module
    if target.type == tp.ops.OPTYPE.OUTPUT:
        return "output"
    if isinstance(module, nn.Parameter):
        name = dg._param_to_name.get(module, "?").rsplit(".", 1)[0]
        return f"layer {name} uses a parameter directly in forward; leanconv cannot resize it"
    name = dg._module2name.get(module)
    if name is None:
        return _op_problem(dg, target)
    if dg.is_out_channel_pruning_fn(item.dep.handler) and not target.outputs:
        return "output"
    if isinstance(module, ImplantConv2d) and dg.is_out_channel_pruning_fn(item.dep.handler):
        return "implant"
    if not isinstance(module, _SUPPORTED) or getattr(module, "transposed", False):
        return f"layer {name or '<model>'} of type {type(module).__name__} cannot be resized by leanconv"
    if isinstance(module, nn.Conv2d) and 1 < module.groups == module.out_channels != module.in_channels:
        return f"conv {name} has groups == out_channels != in_channels, which leanconv cannot resize"
    return None


def _kind(dg: tp.DependencyGraph, handler) -> str:
    return "out" if dg.is_out_channel_pruning_fn(handler) else "in"


def _translate(dg: tp.DependencyGraph, tp_group, size: int) -> tuple[list[Member], list[LayerShare]]:
    """Members (one index per group channel) and shares (every resized module) of a tp group."""
    members: list[Member] = []
    shares: dict[tuple[str, str], list[int]] = {}
    for item in tp_group:
        name = dg._module2name.get(item.dep.target.module)
        if name is None:
            continue
        kind = _kind(dg, item.dep.handler)
        counts = shares.setdefault((name, kind), [0] * size)
        by_root: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs):
            by_root.setdefault(int(root), []).append(int(idx))
            counts[int(root)] += 1
        one_to_one = sorted(by_root) == list(range(size)) and all(len(v) == 1 for v in by_root.values())
        if not one_to_one:
            log.debug("member %s (%s) maps several channels per group channel; left out of scoring", name, kind)
            continue
        idxs = tuple(by_root[k][0] for k in range(size))
        module = item.dep.target.module
        if isinstance(module, ImplantConv2d):
            members += [Member(f"{name}.conv", kind, idxs), Member(f"{name}.implant", kind, idxs)]
        else:
            members.append(Member(name, kind, idxs))
    return members, [LayerShare(n, k, tuple(c)) for (n, k), c in shares.items()]


def trace_groups(
    model: nn.Module, example_input: torch.Tensor, *, ignored: Iterable[str] = (), strict: bool = True
) -> list[TracedGroup]:
    """Channel groups of ``model`` with their units and layer shares (see :func:`channel_groups`)."""
    ignored = set(ignored)
    unknown = ignored - {name for name, _ in model.named_modules()}
    if unknown:
        raise LeanconvError(f"ignored layers {sorted(unknown)} are not in the model")
    dg = build_graph(model, example_input)
    traced: list[TracedGroup] = []
    seen: set[frozenset] = set()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for tp_group in dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        root = dg._module2name[tp_group[0].dep.target.module]
        size = len(tp_group[0].idxs)
        problems = {p for p in (_problem(dg, item) for item in tp_group) if p}
        if problems - {"output", "implant"}:
            msg = f"channels of {root} cannot be pruned: " + "; ".join(sorted(problems - {"output", "implant"}))
            if strict:
                raise LeanconvError(msg + " (to prune the rest and keep those channels: --keep-unprunable, "
                                      "or strict=False in Python)")
            log.warning("%s; they are kept", msg)
            continue
        members, shares = _translate(dg, tp_group, size)
        outs = frozenset((m.module, m.kind) for m in members if m.kind == "out")
        if problems or outs in seen or ignored & {m.module for m in members if m.kind == "out"}:
            continue
        seen.add(outs)
        group = ChannelGroup(root=_first_root(model, members, size, order) or root, size=size,
                             members=tuple(members))
        traced.append(TracedGroup(group, channel_units(model, group), tuple(shares)))
    return sorted(traced, key=lambda t: order[t.group.root])


def _first_root(model: nn.Module, members: Sequence[Member], size: int, order: dict[str, int]) -> str | None:
    """The group's first conv/linear producer in definition order (a readable root)."""
    roots = [m.module for m in members if m.kind == "out" and m.idxs == tuple(range(size))
             and type(model.get_submodule(m.module)) in (nn.Conv2d, nn.Linear)]
    return min(roots, key=order.__getitem__, default=None)


def channel_groups(
    model: nn.Module, example_input: torch.Tensor, *, ignored: Iterable[str] = (), strict: bool = True
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, traced on ``example_input`` (a batch).

    One group per set of coupled channels, rooted at a conv or linear layer; ``ignored``
    names layers whose output channels must stay. Raises :class:`LeanconvError` naming the
    layer or operation leanconv cannot resize safely (``strict=False``: skip and log)."""
    return [t.group for t in trace_groups(model, example_input, ignored=ignored, strict=strict)]


def _is_tied(module: nn.Module) -> bool:
    """A grouped conv whose channels are tied across conv groups (not depthwise, not plain)."""
    if not isinstance(module, nn.Conv2d) or module.groups == 1:
        return False
    return not (module.groups == module.in_channels == module.out_channels)


def channel_units(model: nn.Module, group: ChannelGroup) -> tuple[tuple[int, ...], ...]:
    """Partition ``group``'s channels into units that must be removed together.

    A grouped conv member with ``g`` conv groups of width ``w`` ties the group channels that
    sit at the same offset ``idx % w`` in each conv group, so every conv group loses the same
    channels. Without grouped convs every channel is its own unit. If the ties cannot keep all
    conv groups equally wide, the whole group becomes one unit (never pruned)."""
    parent = list(range(group.size))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tied = []
    for member in group.members:
        module = model.get_submodule(member.module)
        if not _is_tied(module):
            continue
        width = (module.out_channels if member.kind == "out" else module.in_channels) // module.groups
        first: dict[int, int] = {}
        for k, j in enumerate(member.idxs):
            parent[find(k)] = find(first.setdefault(j % width, k))
        tied.append((module.groups, member, width))
    units: dict[int, list[int]] = {}
    for k in range(group.size):
        units.setdefault(find(k), []).append(k)
    result = tuple(tuple(u) for u in units.values())
    for n_blocks, member, width in tied:
        for unit in result:
            blocks = [member.idxs[k] // width for k in unit]
            if len({blocks.count(b) for b in range(n_blocks)}) > 1:
                log.info("group %s: grouped conv %s cannot stay evenly split; its channels are kept", group.root,
                         member.module)
                return (tuple(range(group.size)),)
    return result
