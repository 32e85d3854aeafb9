"""Hessian-vector products of a model's loss and the Rademacher probes that feed them.

Used by :mod:`leanconv.importance.hessian` (Hutchinson traces for HAP, Yu et al. WACV 2022;
HAWQ-V2, Dong et al. 2020). The loss is the size-weighted mean over the given batches,
``L = sum_b (n_b / N) L_b``, so ``H u = sum_b (n_b / N) H_b u``. Two exact methods:

- ``"vmap"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over
  ``functional_call``, vmapped over several vectors (one primal pass per vmap call);
- ``"double_backward"``: ``torch.autograd.grad(create_graph=True)`` once per batch, then one
  grad of ``g . u`` per vector (works with layers that lack forward-mode AD or vmap rules).

Grouped probing (our variance reduction, not in HAP): the weights are dealt into ``G``
groups and each probe ``v`` is split into its ``G`` group parts ``v_g``; channel ``p`` of
group ``g`` uses ``v_p . (H v_g)_p``. Its mean is still ``Tr(H_pp)``, but the cross terms
``v_p . H_pq v_q`` between layers of different groups vanish exactly, at ``G`` HVPs a probe.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from leanconv.errors import LeanconvError

__all__ = ["hvp", "rademacher_probes", "assign_groups", "grouped_hvp", "HVP_METHODS"]

HVP_METHODS = ("vmap", "double_backward")
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


_HVP = {"vmap": _hvp_vmap, "double_backward": _hvp_double_backward}


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
