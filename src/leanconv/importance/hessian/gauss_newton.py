"""Exact per-channel Gauss-Newton blocks from per-image Jacobians (no probe noise).

For the cross-entropy loss of a classifier with logits ``z_n = f(x_n; W)`` the loss Hessian
splits as ``H = G + R``: ``G = (1/N) sum_n J_n^T A_n J_n`` with ``J_n = dz_n / dW`` and
``A_n = diag(p_n) - p_n p_n^T`` (``p_n = softmax(z_n)``), and a rest ``R = (1/N) sum_n
sum_c (p_nc - y_nc) d^2 z_nc / dW^2``. ``G`` (the generalised Gauss-Newton matrix, equal to
the Fisher information for this loss) is positive semi-definite, so its block traces are
never negative, and its diagonal has a closed form per image:

    diag(J^T A J) = sum_c p_c J_c * J_c - (sum_c p_c J_c) * (sum_c p_c J_c)    (elementwise),

where ``J_c`` is the gradient of logit ``c``. Summed over the entries of output channel ``p``
this is ``Tr(G_pp)``, exactly, on the given images; no random probe enters. With the channel's
weights ``W_p`` the same Jacobian gives the whole block's quadratic form ``W_p^T G_pp W_p =
u^T A u`` with ``u = J_p W_p`` (the logits' first-order change when the channel's weights are
zeroed), which HAP's trace form approximates.

**For a piecewise-linear network these blocks are the Hessian's, not an approximation.** With
every other weight fixed, the logits of a network built from convolutions, linear layers,
ReLU (or another piecewise-linear activation), max/average pooling, eval-mode BatchNorm and
residual additions are piecewise linear in one layer's weights, so ``R`` vanishes on every
block inside a layer (almost everywhere): ``H_pp = G_pp``. The zoo's CNNs are such networks.
Only the blocks between two layers differ, and HAP uses none of those. With a curved
activation (SiLU, GELU, sigmoid) ``G_pp`` is the positive semi-definite part of ``H_pp``.

The cost is one Jacobian per image (``C`` vector-Jacobian products, vmapped over a chunk of
images): on the trained ResNet-20 with 512 images about 30 s on one thread, against minutes
for 32 Hutchinson probes (README, Benchmarks).

The returned :class:`~leanconv.importance.hessian.TraceResult` has ``probes = 0`` and, as
``stderr``, the standard error of each trace over the images (the sampling error of the data,
not of an estimator), so the rest of HAP (sensitivity, shrinkage, the report) runs unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from leanconv.errors import LeanconvError
from leanconv.importance.base import check_batches
from leanconv.importance.hessian.result import TraceResult, rel_stderr_quantile, select_weights
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = ["gauss_newton_traces", "check_cross_entropy", "MAX_JACOBIAN_FLOATS"]

log = logging.getLogger(__name__)

MAX_JACOBIAN_FLOATS = 2**25  # per-chunk Jacobian size (128 MiB in float32): sets the images per chunk


def check_cross_entropy(loss_fn: Callable, estimator: str) -> None:
    """The Gauss-Newton form above is the cross-entropy loss's: refuse any other loss."""
    if loss_fn is not nn.functional.cross_entropy:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise LeanconvError(f"the {estimator} Hessian estimator is exact only for the cross-entropy loss, not "
                            f"{name}; use estimator 'hutchinson' (or 'hutch++') for another loss")


def gauss_newton_traces(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    params: Mapping[str, Tensor] | None = None,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    chunk: int | None = None,
    progress: Progress | None = None,
):
    """``Tr(G_pp)`` for every output channel of the selected weights (module docstring).

    ``batches``: (x, y) validation batches (the labels are only checked; the Gauss-Newton
    matrix does not use them). ``params``: name -> Parameter of ``model`` (default: every
    Conv2d and Linear weight). ``chunk``: images per vmapped Jacobian (default: as many as fit
    in :data:`MAX_JACOBIAN_FLOATS`). The model must return logits ``[N, classes]``; it runs in
    eval mode (BatchNorm with its running statistics, so images are independent) and is never
    modified. ``progress(done, total, info)`` is called after every chunk."""
    check_cross_entropy(loss_fn, "gauss-newton")
    batches = [(to_model(x, model), to_model(y, model)) for x, y in batches]
    if not batches:
        raise LeanconvError("no data batches given for the Gauss-Newton traces; pass at least one (x, y) batch")
    sel, fixed = select_weights(model, params)
    if not sel:
        raise LeanconvError("no weights selected for the Gauss-Newton traces; the model has no Conv2d or Linear")
    check_batches(model, batches, loss_fn)
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        classes = _logits(model, batches[0][0][:1]).shape[-1]
    size = sum(p.numel() for p in sel.values())
    per_chunk = chunk or max(1, min(256, MAX_JACOBIAN_FLOATS // max(1, classes * size)))
    images = sum(int(x.shape[0]) for x, _ in batches)
    s1 = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in sel.items()}
    s2 = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in sel.items()}
    quad = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in sel.items()}

    def logits(p: dict, x: Tensor) -> tuple[Tensor, Tensor]:  # the logits, and again as jacrev's aux output
        z = functional_call(model, {**fixed, **p}, (x.unsqueeze(0),)).squeeze(0)
        return z, z.detach()

    vmapped = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))
    done, looped = 0, False
    with eval_mode(model), torch.no_grad():
        for x, _ in batches:
            for a in range(0, x.shape[0], per_chunk):
                xs = x[a:a + per_chunk]
                if not looped:
                    try:
                        jacobians, z = vmapped(sel, xs)
                    except (RuntimeError, NotImplementedError) as exc:  # e.g. an autograd.Function without vmap
                        log.info("per-image Jacobians by vmap failed (%s); taking them image by image", exc)
                        looped = True
                if looped:
                    jacobians, z = _jacobians_one_by_one(logits, sel, xs, classes)
                prob = torch.softmax(z.double(), dim=-1)  # [n, C], from the Jacobians' own forward
                for name, j in jacobians.items():  # j: [n, C, *shape]
                    _accumulate(j, prob, sel[name], (s1[name], s2[name], quad[name]))
                done += xs.shape[0]
                if progress is not None:
                    progress(done, images, {"method": "gauss-newton"})
    mean = {n: s / images for n, s in s1.items()}
    stderr = {n: ((s2[n] / images - mean[n] ** 2).clamp_min(0) / max(images - 1, 1)).sqrt() for n in sel}
    dtype = next(iter(sel.values())).dtype
    return TraceResult(
        traces={n: t.to(dtype) for n, t in mean.items()},
        stderr={n: t.to(dtype) for n, t in stderr.items()},
        numel_per_channel={n: p[0].numel() for n, p in sel.items()},
        probes=0,
        converged=True,
        method="gauss-newton" + (" (image by image)" if looped else ""),
        seconds=time.perf_counter() - start,
        achieved_rel_stderr=rel_stderr_quantile(mean, stderr, 0.5),  # the images' sampling error
        quadratic={n: (q / images).to(dtype) for n, q in quad.items()},
    )


def _jacobians_one_by_one(logits: Callable, sel: dict, xs: Tensor, classes: int) -> tuple[dict[str, Tensor], Tensor]:
    """The per-image Jacobians by plain backward passes (one per image and class), and the
    logits: slower than the vmapped ones, but they work for any layer that has a backward."""
    names = list(sel)
    out = {n: torch.empty(xs.shape[0], classes, *p.shape, dtype=p.dtype) for n, p in sel.items()}
    zs = []
    with torch.enable_grad():
        for i, x in enumerate(xs):
            leaves = {n: p.detach().requires_grad_(True) for n, p in sel.items()}
            z, plain = logits(leaves, x)
            zs.append(plain)
            for c in range(classes):
                grads = torch.autograd.grad(z[c], [leaves[n] for n in names], retain_graph=c < classes - 1,
                                            allow_unused=True)
                for n, g in zip(names, grads):
                    out[n][i, c] = 0 if g is None else g
    return out, torch.stack(zs)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if not torch.is_tensor(out) or out.dim() != 2:
        raise LeanconvError("the Gauss-Newton Hessian estimator needs a classifier returning logits [N, classes], "
                            f"got {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}; "
                            "use estimator 'hutchinson'")
    return out


def _accumulate(j: Tensor, prob: Tensor, weight: Tensor, sums: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add each image's per-channel ``Tr(J^T A J)`` and ``W_p^T J^T A J W_p`` (``j``: [n, C, out,
    ...]; ``weight``: [out, ...]) to the running sums (trace, trace squared, quadratic form)."""
    s1, s2, quad = sums
    n, c, out = j.shape[0], j.shape[1], j.shape[2]
    j = j.reshape(n, c, out, -1).double()
    w = prob[:, :, None, None]
    diag = (w * j * j).sum(1) - (w * j).sum(1).pow(2)  # [n, out, k]: the diagonal of J^T A J
    per_image = diag.sum(-1)  # [n, out]
    s1 += per_image.sum(0)
    s2 += per_image.pow(2).sum(0)
    u = (j * weight.reshape(out, -1).double()).sum(-1)  # [n, C, out]: J_p W_p, the logits' change
    p = prob[:, :, None]
    quad += ((p * u * u).sum(1) - (p * u).sum(1).pow(2)).sum(0)
