"""A periodic sparse conv as a sum of dense grouped convs: a form every runtime can run.

In pSConv the kernel of output filter ``o`` and input channel ``j`` uses pattern
``t = (o + j + 1) mod P``, so it depends only on the residue classes ``a = o mod P`` and
``b = j mod P``. Take the patterns that keep one position set ``S`` (psd4_p8: {1, 5} keep the
top-left 2x2 box, {2, 6} the top-right, {3, 7} the bottom-left, {4} the bottom-right, {0} the
whole 3x3). Output class ``a`` reads, with ``S``'s taps, the input classes ``b`` with
``(a + b + 1) mod P`` in that set; classes that read the same input classes form a group, and
for every pattern set of :data:`~leanconv.layers.periodic_sparse.PATTERNS` the groups are
complete and of one size. So each position set is one dense grouped conv whose kernel is
``S``'s bounding box (2x2 for the boxes, 1x2 for psd2_p8's pairs, 1x1 for single taps) on the
input channels gathered in group order; all sets put their outputs in one channel order, so
their results add up directly, and one gather restores the filters' order at the end.

It runs exactly the nonzero multiply-adds (where a set's positions fill its box, as in every
pattern set here) with dense-conv kernels, exports to ONNX as ``Pad``, ``Gather``, ``Slice``,
``Conv`` (with ``group``) and ``Add``, and needs channel counts that are multiples of the
period (:func:`grouped_form` returns None otherwise). It pays where a runtime's dense conv is
slow per MAC (many channels on small images); measured, not assumed:
:mod:`leanconv.convs.placement` chooses per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["GroupedForm", "grouped_form", "grouped_weights", "grouped_conv"]


@dataclass(frozen=True)
class _Part:
    in_index: torch.Tensor  # input channels in group order
    shape: tuple[int, int, int, int]  # its grouped conv's weight: [out, in per group, kh, kw]
    groups: int
    r0: int
    c0: int


@dataclass(frozen=True)
class GroupedForm:
    """The grouped convs of one layer: ``weight_index`` picks every part's weight, in order,
    from ``[weight_nz, 0]`` (:func:`grouped_weights`); ``restore`` gathers the filters' order."""

    parts: tuple[_Part, ...]
    weight_index: torch.Tensor
    restore: torch.Tensor


def _position_sets(table) -> dict[tuple[int, ...], list[int]]:
    sets: dict[tuple[int, ...], list[int]] = {}
    for t, positions in enumerate(table):
        sets.setdefault(tuple(sorted(positions)), []).append(t)
    return dict(sorted(sets.items(), key=lambda kv: -len(kv[1])))  # coarsest grouping first


def _groups(period: int, ts: list[int]) -> list[tuple[tuple[int, ...], list[int]]] | None:
    """(input classes, output classes) of each group, or None when the groups are not complete
    bipartite blocks of one size."""
    reads = {a: tuple(b for b in range(period) if (a + b + 1) % period in ts) for a in range(period)}
    by_inputs: dict[tuple[int, ...], list[int]] = {}
    for a, ins in reads.items():
        by_inputs.setdefault(ins, []).append(a)
    groups = list(by_inputs.items())
    if len({(len(i), len(o)) for i, o in groups}) != 1:
        return None
    return groups


def grouped_form(out_channels: int, in_channels: int, table, nz_index: torch.Tensor) -> GroupedForm | None:
    """The grouped form of a pSConv with these channels, pattern table (positions kept by each
    ``t``) and nonzero indices, or None where it does not exist."""
    period = len(table)
    if out_channels % period or in_channels % period:
        return None
    flat_to_nz = torch.full((out_channels * in_channels * 9,), -1, dtype=torch.int64)
    flat_to_nz[nz_index] = torch.arange(nz_index.numel())
    nz_of = flat_to_nz.view(out_channels, in_channels, 9)
    zero_slot = nz_index.numel()
    order: list[int] | None = None
    parts, indices, out_channels_order = [], [], None
    for positions, ts in _position_sets(table).items():
        groups = _groups(period, ts)
        if groups is None:
            return None
        if order is None:
            order = [a for _, outs in groups for a in outs]
        rank = {a: k for k, a in enumerate(order)}
        groups.sort(key=lambda g: min(rank[a] for a in g[1]))
        outs = [o for _, classes in groups for a in sorted(classes, key=rank.get)
                for o in range(a, out_channels, period)]
        if out_channels_order is None:
            out_channels_order = outs
        elif outs != out_channels_order:  # the sets order their outputs differently: no direct sum
            return None
        ins = [[j for b in sorted(classes) for j in range(b, in_channels, period)] for classes, _ in groups]
        rows, cols = [p // 3 for p in positions], [p % 3 for p in positions]
        r0, c0 = min(rows), min(cols)
        kh, kw = max(rows) - r0 + 1, max(cols) - c0 + 1
        per_group = len(outs) // len(groups)
        box = torch.tensor([(r0 + dy) * 3 + c0 + dx for dy in range(kh) for dx in range(kw)])
        w_index = torch.empty(len(outs), len(ins[0]), kh * kw, dtype=torch.int64)
        for g, inputs in enumerate(ins):
            block = outs[g * per_group:(g + 1) * per_group]
            w_index[g * per_group:(g + 1) * per_group] = nz_of[block][:, inputs][:, :, box]
        w_index[w_index < 0] = zero_slot
        indices.append(w_index.reshape(-1))
        parts.append(_Part(torch.tensor([j for group in ins for j in group]), (len(outs), len(ins[0]), kh, kw),
                           len(groups), r0, c0))
    restore = torch.argsort(torch.tensor(out_channels_order))
    return GroupedForm(tuple(parts), torch.cat(indices), restore)


def grouped_weights(weight_nz: torch.Tensor, form: GroupedForm) -> torch.Tensor:
    """Every part's grouped-conv weight, flat and in order (differentiable in ``weight_nz``)."""
    flat = torch.cat([weight_nz, weight_nz.new_zeros(1)])
    return flat[form.weight_index.to(weight_nz.device)]


def grouped_conv(x: torch.Tensor, weights: torch.Tensor, form: GroupedForm, stride: int,
                 padding: int) -> torch.Tensor:
    """``conv2d(x, dense(weight_nz), stride, padding)`` computed as :class:`GroupedForm`'s sum of
    grouped convs; ``weights`` is :func:`grouped_weights`'s (differentiable in both)."""
    h_out = (x.shape[2] + 2 * padding - 3) // stride + 1
    w_out = (x.shape[3] + 2 * padding - 3) // stride + 1
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    y, start = None, 0
    for part in form.parts:
        out, per_group, kh, kw = part.shape
        weight = weights[start:start + out * per_group * kh * kw].view(part.shape)
        start += weight.numel()
        rows = slice(part.r0, part.r0 + (h_out - 1) * stride + kh)
        cols = slice(part.c0, part.c0 + (w_out - 1) * stride + kw)
        z = F.conv2d(xp[:, :, rows, cols].index_select(1, part.in_index.to(x.device)), weight, stride=stride,
                     groups=part.groups)
        y = z if y is None else y + z
    return y.index_select(1, form.restore.to(x.device))
