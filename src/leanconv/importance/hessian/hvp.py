"""Hessian-vector products of a model's loss and the Rademacher probes that feed them.

Used by :mod:`leanconv.importance.hessian` (Hutchinson traces for HAP, Yu et al. WACV 2022;
HAWQ-V2, Dong et al. 2020). The loss is the size-weighted mean over the given batches,
``L = sum_b (n_b / N) L_b``, so ``H u = sum_b (n_b / N) H_b u``. Two exact methods:

- ``"vmap"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over
  ``functional_call``, vmapped over several vectors (one primal pass per vmap call);
- ``"double_backward"``: ``torch.autograd.grad(create_graph=True)`` once per batch, then one
  grad of ``g . u`` per vector (works with layers that lack forward-mode AD or vmap rules);
- ``"lean_double_backward"``: the same, with 2-D convolutions and eval-mode batch norm routed
  through ops whose derivatives are plain convolutions and products (:class:`_LeanOps`).
  PyTorch differentiates ``convolution_backward`` by ``_convolution_double_backward`` and eval
  batch norm by the general ``batch_norm_double_backward``; on a 1-thread CPU these made the
  per-vector pass ~2.7x the forward+backward instead of the ~2x its convolution count needs,
  so sharing the forward+backward over several vectors bought little. Same Hessian, exactly.

Grouped probing (our variance reduction, not in HAP): the weights are dealt into ``G``
groups and each probe ``v`` is split into its ``G`` group parts ``v_g``; channel ``p`` of
group ``g`` uses ``v_p . (H v_g)_p``. Its mean is still ``Tr(H_pp)``, but the cross terms
``v_p . H_pq v_q`` between layers of different groups vanish exactly, at ``G`` HVPs a probe.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from leanconv.errors import LeanconvError

__all__ = ["hvp", "rademacher_probes", "assign_groups", "grouped_hvp", "HVP_METHODS"]

HVP_METHODS = ("vmap", "double_backward", "lean_double_backward")
LossFn = Callable[[Tensor, Tensor], Tensor]


def _loss_closure(model, fixed, loss_fn, x, y, scale):
    """``p -> scale * loss(model with weights p and the fixed rest, x, y)``."""

    def f(p):
        return scale * loss_fn(functional_call(model, {**fixed, **p}, (x,)), y)

    return f


def _hvp_vmap(model, sel, fixed, batches, loss_fn, us, chunk):
    """``H u`` for stacked ``us[name]: [m, *shape]``, vmapping at most ``chunk`` vectors at once."""
    n_total = sum(int(x.shape[0]) for x, _ in batches)
    m = next(iter(us.values())).shape[0]
    out = {n: torch.zeros_like(u) for n, u in us.items()}
    for x, y in batches:
        grad_f = torch.func.grad(_loss_closure(model, fixed, loss_fn, x, y, x.shape[0] / n_total))
        batched = torch.func.vmap(lambda u: torch.func.jvp(grad_f, (sel,), (u,))[1])
        for a in range(0, m, chunk):
            hu = batched({n: u[a : a + chunk] for n, u in us.items()})
            for n in out:
                out[n][a : a + chunk] += hu[n]
    return out


def _hvp_double_backward(model, sel, fixed, batches, loss_fn, us, chunk):
    """``H u`` by double backward; ``chunk`` is unused (all vectors share one gradient graph)."""
    n_total = sum(int(x.shape[0]) for x, _ in batches)
    names = list(sel)
    m = next(iter(us.values())).shape[0]
    out = {n: torch.zeros_like(us[n]) for n in names}
    leaves = {n: sel[n].detach().requires_grad_(True) for n in names}
    for x, y in batches:
        loss = _loss_closure(model, fixed, loss_fn, x, y, x.shape[0] / n_total)(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True)
        for i in range(m):
            gu = sum((g * us[n][i]).sum() for g, n in zip(grads, names))
            hu = torch.autograd.grad(gu, [leaves[n] for n in names], retain_graph=i < m - 1, allow_unused=True)
            for n, h in zip(names, hu):
                if h is not None:
                    out[n][i] += h
    return out


Pair = tuple[int, int]


def _pair(v: int | tuple[int, ...] | list[int]) -> Pair:
    return (int(v[0]), int(v[-1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_input_grad(g: Tensor, w: Tensor, conf: tuple, hw: torch.Size) -> Tensor:
    """Gradient of ``conv2d(x, w)`` w.r.t. ``x`` for output gradient ``g``: the transposed
    convolution, with the output padding that restores ``x``'s size ``hw`` under stride."""
    stride, padding, dilation, groups = conf
    extra = [hw[i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[2 + i] - 1) + 1)
             for i in range(2)]
    return F.conv_transpose2d(g, w, None, stride, padding, extra, groups, dilation)


class _ConvWeightGrad(torch.autograd.Function):
    """``(x, g) -> dL/dw`` of ``conv2d(x, w)``, bilinear in ``x`` and ``g``; its own derivatives
    are a transposed convolution (for ``x``) and a convolution (for ``g``), never
    ``_convolution_double_backward``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor, w: Tensor, conf: tuple) -> Tensor:
        ctx.save_for_backward(x, g)
        ctx.conf = conf
        stride, padding, dilation, groups = conf
        mask = [False, True, False]
        return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask)[1]

    @staticmethod
    def backward(ctx: Any, gw: Tensor) -> tuple:
        x, g = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = _conv_input_grad(g, gw, ctx.conf, x.shape[2:]) if ctx.needs_input_grad[0] else None
        gg = F.conv2d(x, gw, None, stride, padding, dilation, groups) if ctx.needs_input_grad[1] else None
        return gx, gg, None, None


class _Conv2d(torch.autograd.Function):
    """``conv2d`` whose backward is built from differentiable ops (:class:`_ConvWeightGrad`, a
    transposed convolution), so a second differentiation costs plain convolutions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, conf: tuple) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf = conf
        stride, padding, dilation, groups = conf
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        gx = _conv_input_grad(g, w, ctx.conf, x.shape[2:]) if need_x else None
        gw = _ConvWeightGrad.apply(x, g, w, ctx.conf) if need_w else None
        return gx, gw, g.sum((0, 2, 3)) if need_b else None, None


_CONV_SIG = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in (
    ("input", inspect.Parameter.empty), ("weight", inspect.Parameter.empty), ("bias", None),
    ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))])
_BN_SIG = inspect.signature(F.batch_norm)


class _LeanOps(TorchFunctionMode):
    """While active, ``conv2d`` with numeric padding on 4-D input runs as :class:`_Conv2d`, and
    eval-mode ``batch_norm`` (running statistics) as the per-channel affine map it is. Values
    are those of the original ops (up to rounding); only how autograd differentiates them
    changes. Anything else passes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            a = _CONV_SIG.bind(*args, **kwargs)
            a.apply_defaults()
            p = a.arguments
            if not isinstance(p["padding"], str) and p["input"].dim() == 4:
                conf = (_pair(p["stride"]), _pair(p["padding"]), _pair(p["dilation"]), int(p["groups"]))
                return _Conv2d.apply(p["input"], p["weight"], p["bias"], conf)
        elif func is F.batch_norm:
            a = _BN_SIG.bind(*args, **kwargs)
            a.apply_defaults()
            p = a.arguments
            if not p["training"] and p["running_mean"] is not None and p["running_var"] is not None:
                scale = torch.rsqrt(p["running_var"] + p["eps"])
                scale = scale * p["weight"] if p["weight"] is not None else scale
                shift = p["bias"] - p["running_mean"] * scale if p["bias"] is not None else -p["running_mean"] * scale
                shape = (1, -1) + (1,) * (p["input"].dim() - 2)
                return p["input"] * scale.view(shape) + shift.view(shape)
        return func(*args, **kwargs)


def _hvp_lean_double_backward(model, sel, fixed, batches, loss_fn, us, chunk):
    """``H u`` by double backward under :class:`_LeanOps`; every vector of the call shares one
    forward+backward per batch (``chunk`` unused), which is where batching probes pays."""
    with _LeanOps():
        return _hvp_double_backward(model, sel, fixed, batches, loss_fn, us, chunk)


_HVP = {"vmap": _hvp_vmap, "double_backward": _hvp_double_backward, "lean_double_backward": _hvp_lean_double_backward}


def hvp(
    model: nn.Module,
    sel: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    us: Mapping[str, Tensor],
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
    method: str = "vmap",
    chunk: int = 4,
) -> dict[str, Tensor]:
    """``H u`` for each of the ``m`` stacked vectors ``us[name]: [m, *sel[name].shape]``.

    ``H`` is the Hessian of the batch-size-weighted mean loss with respect to the tensors
    ``sel`` (name -> detached weight); ``fixed`` holds every other parameter and is held
    constant. The model runs in whatever mode it is in (callers put it in eval mode).
    """
    if method not in _HVP:
        raise LeanconvError(f"unknown HVP method {method!r}; choose one of: {', '.join(HVP_METHODS)}")
    return _HVP[method](model, dict(sel), dict(fixed), batches, loss_fn, dict(us), max(1, int(chunk)))


def rademacher_probes(gen: torch.Generator, sel: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """``k`` Rademacher (+-1) probes over all of ``sel`` at once, stacked as ``[k, *shape]``.
    Each probe is drawn on its own, so probe ``i`` depends only on the generator's seed and
    ``i``, not on how many probes are drawn together."""
    sizes = [p.numel() for p in sel.values()]
    ref = next(iter(sel.values()))
    rows = [torch.randint(0, 2, (sum(sizes),), generator=gen, dtype=torch.int8) for _ in range(k)]
    flat = torch.stack(rows).to(device=ref.device, dtype=ref.dtype).mul_(2).sub_(1)
    parts = flat.split(sizes, dim=1)
    return {n: part.reshape(k, *p.shape) for (n, p), part in zip(sel.items(), parts)}


def assign_groups(names: list[str], probe_groups: int | str) -> dict[str, int]:
    """Deal weights into probe groups round-robin in model order (neighbouring layers, which
    couple most, land in different groups). ``probe_groups``: 1 = plain Hutchinson, one HVP a
    probe; ``G`` > 1 = G groups; ``"layer"`` = one group per weight."""
    if probe_groups == "layer":
        g = len(names)
    elif isinstance(probe_groups, int) and not isinstance(probe_groups, bool) and probe_groups >= 1:
        g = min(probe_groups, len(names))
    else:
        raise LeanconvError(f"probe_groups must be a positive integer or 'layer', got {probe_groups!r}")
    return {n: i % g for i, n in enumerate(names)}


def grouped_hvp(model, sel, fixed, batches, vs, groups: Mapping[str, int], **kw) -> dict[str, Tensor]:
    """For probes ``vs[name]: [k, *shape]``, return per weight ``(H v_g)`` restricted to that
    weight, where ``v_g`` is the probe's part on the weight's own group (``g = groups[name]``).
    With one group this is plain ``H v``; with G groups it costs ``k * G`` HVPs."""
    n_groups = max(groups.values()) + 1
    if n_groups == 1:
        return hvp(model, sel, fixed, batches, vs, **kw)
    k = next(iter(vs.values())).shape[0]
    us = {}
    for n, v in vs.items():  # vector i * G + g carries probe i on group g only
        u = torch.zeros((k, n_groups, *v.shape[1:]), dtype=v.dtype, device=v.device)
        u[:, groups[n]] = v
        us[n] = u.reshape(k * n_groups, *v.shape[1:])
    hu = hvp(model, sel, fixed, batches, us, **kw)
    return {n: h.reshape(k, n_groups, *h.shape[1:])[:, groups[n]] for n, h in hu.items()}
