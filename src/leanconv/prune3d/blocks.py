"""Depth pruning: find the residual blocks of a CNN, bypass the least important.

Paper: Wang, Li, Zhang et al., "Accelerate CNNs from Three Dimensions: A Comprehensive
Pruning Framework" (ICML 2021), the depth dimension ``d`` (methods.md, section 1). A block is
removed by replacing it with ``nn.Identity``; ``leanconv.checkpoint.save`` stores that as an
``"identity"`` edit with no bookkeeping here.

**Which blocks can be removed** (the rule, also in the README): *a module inside an
``nn.Sequential`` with equal input and output shapes whose forward adds its input to its
output.* Shapes come from one forward pass with hooks (channels and spatial size must match,
so a block that changes width or stride never qualifies). The residual add is found by
tracing the block alone with ``torch.fx`` (every sub-module except ``nn.Sequential`` is kept
opaque): there must be an ``add`` (``+``, ``+=``, ``torch.add``, ``Tensor.add``) one of whose
operands is the block's input, possibly through ``nn.Identity`` or an empty
``nn.Sequential``, and the sum must reach the block's output. A projection shortcut
(``x + bn(conv(x))``) does not count. When tracing fails (data-dependent control flow),
the zoo's own residual types are recognised instead: ``BasicBlock`` and ``PreActBlock``
with an identity shortcut, ``InvertedResidual`` with ``use_residual``. A block nested inside
another removable block is not listed (bypassing the outer one removes it).

**Depth ratio** ``d`` = kept removable blocks / removable blocks of the original model: only
blocks listed by :func:`find_residual_blocks` count (the first block of a ResNet stage,
which changes shape, always stays and is not counted). Pass the list found on the unpruned
model to :func:`prune_blocks` and :func:`depth_ratio`; listed blocks that are already
``nn.Identity`` count as removed, so depth can be pruned step by step.

The importance that ranks the blocks (``block_importance``, higher = keep) and the checks
of a ranking live in :mod:`leanconv.prune3d.block_importance`.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from leanconv.cost import count
from leanconv.errors import LeanconvError
from leanconv.models.mobilenetv2 import InvertedResidual
from leanconv.models.preact_resnet import PreActBlock
from leanconv.models.resnet_cifar import BasicBlock
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode

__all__ = [
    # finding blocks
    "BlockInfo",
    "find_residual_blocks",
    "adds_input",
    # removing
    "bypassed",
    "prune_blocks",
    "shallowest",
    "depth_ratio",
]

log = logging.getLogger(__name__)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclass(frozen=True)
class BlockInfo:
    """A removable residual block. ``path`` is its module path (``"layer1.1"``), ``stage`` the
    path of the ``nn.Sequential`` holding it (``""`` for the model itself), ``index`` its
    position there. Shapes are for one image ``(C, H, W)``; ``macs`` (multiply-accumulates,
    one image, :func:`leanconv.cost.count`) and ``params`` are the block's own."""

    path: str
    stage: str
    index: int
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    params: int


# ---------------------------------------------------------------- detection


class _BlockTracer(fx.Tracer):
    """Traces one block's own forward: sub-modules stay opaque, except ``nn.Sequential``."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, nn.Sequential)


def _source(node: fx.Node, root: nn.Module) -> fx.Node:
    """Follow ``node`` back through ``nn.Identity`` calls to the value it passes on."""
    while node.op == "call_module" and isinstance(root.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def adds_input(block: nn.Module) -> bool | None:
    """True when ``block``'s forward adds its (first) input to a value that reaches its output,
    False when it does not, None when ``torch.fx`` cannot trace it."""
    try:
        graph = _BlockTracer().trace(block)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "unknown"
        log.debug("cannot trace %s (%s); using the zoo's residual types", type(block).__name__, exc)
        return None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if not inputs or not outputs:
        return False
    x, reaches_output = inputs[0], _ancestors(outputs[0])
    for node in nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ADD_METHODS)
        if not is_add or node not in reaches_output:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if any(_source(a, block) is x for a in operands):
            return True
    return False


def _identity_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0)


def _zoo_residual(block: nn.Module) -> bool:
    """The fallback rule: leanconv's own residual block types, when their add uses the input."""
    if isinstance(block, (BasicBlock, PreActBlock)):
        return _identity_like(block.shortcut)
    return isinstance(block, InvertedResidual) and bool(block.use_residual)


def _is_residual(block: nn.Module) -> bool:
    traced = adds_input(block)
    return _zoo_residual(block) if traced is None else traced


def _candidates(model: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
    """(path, stage path, index, module) of every child of every ``nn.Sequential``."""
    found = []
    for stage, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for index, (name, child) in enumerate(seq.named_children()):
            if not isinstance(child, nn.Identity):
                found.append((f"{stage}.{name}" if stage else name, stage, index, child))
    return found


def _record_shapes(model: nn.Module, example_input: Tensor, modules: Mapping[str, nn.Module]) -> dict:
    """Run ``model`` once; per path the per-image (input, output) shapes, or None when the
    module took or returned something other than one tensor, or its shapes varied."""
    shapes: dict[str, tuple | None] = {}

    def hook_for(path: str):
        def hook(module, args, output):
            ok = len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor)
            seen = (tuple(args[0].shape[1:]), tuple(output.shape[1:])) if ok else None
            shapes[path] = seen if shapes.get(path, seen) == seen else None
        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in modules.items()]
    with eval_mode(model), torch.no_grad():
        try:
            model(example_input)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise LeanconvError(f"the model does not run on the example input of shape "
                                f"{tuple(example_input.shape)}: {exc}") from exc
        finally:
            for h in handles:
                h.remove()
    return shapes


def find_residual_blocks(model: nn.Module, example_input: Tensor) -> list[BlockInfo]:
    """The blocks of ``model`` that :func:`prune_blocks` may replace by ``nn.Identity``, in
    module order: children of an ``nn.Sequential`` with equal input and output shapes on
    ``example_input`` (a batch ``[N, C, H, W]``) whose forward adds their input to their output
    (rule in the module docstring)."""
    cands = _candidates(model)
    shapes = _record_shapes(model, to_model(example_input, model), {p: m for p, _, _, m in cands})
    chosen = []
    for path, stage, index, module in cands:
        seen = shapes.get(path)
        if seen is None or seen[0] != seen[1] or any(path.startswith(c[0] + ".") for c in chosen):
            continue
        if _is_residual(module):
            chosen.append((path, stage, index, module, seen[0]))
    report = count(model, tuple(example_input.shape[1:]))
    out = []
    for path, stage, index, module, shape in chosen:
        macs = sum(row.macs for row in report.layers if row.name == path or row.name.startswith(path + "."))
        params = sum(p.numel() for p in module.parameters())
        out.append(BlockInfo(path, stage, index, type(module).__name__, shape, shape, macs, params))
    return out


# ---------------------------------------------------------------- bypassing


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise LeanconvError(f"the model has no block {path!r}; find blocks on this model") from exc


@contextmanager
def bypassed(model: nn.Module, paths: Iterable[str]) -> Iterator[nn.Module]:
    """Temporarily replace the modules at ``paths`` by ``nn.Identity``; restored on exit."""
    saved = [(p, _module(model, p)) for p in paths]
    try:
        for p, _ in saved:
            _set_module(model, p, nn.Identity())
        yield model
    finally:
        for p, m in reversed(saved):
            _set_module(model, p, m)


def _alive(model: nn.Module, blocks: Sequence[BlockInfo]) -> list[BlockInfo]:
    return [b for b in blocks if not isinstance(_module(model, b.path), nn.Identity)]


def depth_ratio(model: nn.Module, blocks: Sequence[BlockInfo]) -> float:
    """``d``: the fraction of ``blocks`` (found on the original model) not yet bypassed."""
    if not blocks:
        raise LeanconvError("the model has no removable residual blocks; depth pruning does not apply")
    return len(_alive(model, blocks)) / len(blocks)


# ---------------------------------------------------------------- pruning


def _least_important(blocks: Sequence[BlockInfo], importance: Mapping[str, float]) -> list[BlockInfo]:
    """``blocks`` from least to most important; ties keep the later block first (deeper
    blocks of a stage are usually the more redundant)."""
    missing = [b.path for b in blocks if b.path not in importance]
    if missing:
        raise LeanconvError(f"no importance for block(s) {', '.join(missing)}; score the same blocks you prune")
    order = sorted(range(len(blocks)), key=lambda i: (float(importance[blocks[i].path]), -i))
    return [blocks[i] for i in order]


def _keep_count(keep: int | float, n: int) -> int:
    """``keep`` as a number of blocks: an int is a count, a float the ratio ``d`` of ``n``
    rounded to the nearest count (halves up)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise LeanconvError(f"keep must be a block count or a depth ratio in [0, 1], got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 <= keep <= 1.0:
            raise LeanconvError(f"depth ratio must be in [0, 1], got {keep}")
        return math.floor(keep * n + 0.5)
    if not 0 <= keep <= n:
        raise LeanconvError(f"cannot keep {keep} of {n} removable blocks")
    return keep


def prune_blocks(
    model: nn.Module,
    blocks: Sequence[BlockInfo],
    importance: Mapping[str, float],
    keep: int | float,
    *,
    min_per_stage: int = 1,
) -> list[str]:
    """Replace the least important of ``blocks`` by ``nn.Identity`` in place until ``keep`` of
    them remain; returns the paths bypassed now, least important first.

    ``keep``: an int counts blocks; a float is the depth ratio ``d`` (kept / ``len(blocks)``,
    rounded to the nearest count). Blocks already bypassed count as removed; if no more than
    ``keep`` remain, nothing changes. At least ``min_per_stage`` of each stage's listed blocks
    stay (all of them when the stage has fewer); a ``keep`` below that floor raises.
    """
    if isinstance(min_per_stage, bool) or not isinstance(min_per_stage, int) or min_per_stage < 0:
        raise LeanconvError(f"min_per_stage must be a whole number >= 0, got {min_per_stage!r}")
    target = _keep_count(keep, len(blocks))
    alive = _alive(model, blocks)
    per_stage: dict[str, int] = {}
    for b in alive:
        per_stage[b.stage] = per_stage.get(b.stage, 0) + 1
    floors = {s: min(min_per_stage, n) for s, n in per_stage.items()}
    if target < sum(floors.values()):
        raise LeanconvError(f"cannot keep only {target} blocks with min_per_stage={min_per_stage} over "
                            f"{len(floors)} stages; keep more blocks or lower min_per_stage")
    removed = []
    for b in _least_important(alive, importance):
        if len(alive) - len(removed) <= target:
            break
        if per_stage[b.stage] > floors[b.stage]:
            _set_module(model, b.path, nn.Identity())
            per_stage[b.stage] -= 1
            removed.append(b.path)
    log.info("bypassed %d residual blocks: %s", len(removed), ", ".join(removed))
    return removed


def shallowest(model: nn.Module, blocks: Sequence[BlockInfo], keep: int, *, min_per_stage: int = 1) -> nn.Module:
    """A copy of ``model`` at the smallest depth a search box allows: the costliest of ``blocks``
    (by their MACs) bypassed until ``keep`` remain, each stage keeping ``min_per_stage``."""
    model = copy.deepcopy(model)
    if blocks:
        costly_first = {b.path: -float(b.macs) for b in blocks}
        prune_blocks(model, blocks, costly_first, keep, min_per_stage=min_per_stage)
    return model
