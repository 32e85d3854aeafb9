"""Start converted layers from the trained convs they replace, fitted on images.

Method: layer-wise least-squares reconstruction of each replaced conv's output, progressively
(He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, Eq. 1:
the regressors come from the partly fitted new model, the target from the original one). The
layers are those of :mod:`leanconv.convs.convert`: pSConv (Kundu et al., IEEE Trans.
Computers 2020) and DSXplore's DW + SCC (Wang et al., IPDPS 2021).

Layers are fitted one at a time in forward order. For the layer at ``path``, ``X`` holds the
new layer's input unfolded into patches (rows: images x output positions; columns: input
channel x kernel tap, the ``[out, in, kh, kw]`` weight's layout) and ``Y`` the original
conv's output at ``path``. Only the moments ``X^T X``, ``X^T Y``, ``sum y`` and ``sum y^2``
are kept (float64, batch by batch), and every solve is a ridge system pulled towards the
start: ``w = argmin ||y - X w||^2 + lam ||w - w0||^2``, ``lam = ridge * mean(diag)``, so the
fit never explains less than its start, and a start that is already exact stays exact.

* ``psconv``: start from the trained taps kept on the pattern; then one system per output
  channel on its support (outputs sharing a support share the factorisation). A bias is
  fitted as one more column of ones.
* ``scc`` (a 1x1 conv replaced by an SCC): start from the trained 1x1 weights on each
  output's window; then one system per output on its window.
* ``dw_scc`` (``W[o, i] ~ S[o, i] D[i]``, ``S`` zero off the windows): the weight-space start
  is exact per input channel ``i``, a rank-1 problem solved by the SVD of ``W[:, i]`` masked to
  the outputs that read ``i`` (Eckart-Young; alternating steps could not improve it). Then ``S``
  is fitted on data with ``D`` fixed: the depthwise output's Gram matrix is ``D^T X^T X D``,
  taken from the patch moments. ``als_steps`` more rounds alternate ``D`` given ``S`` (the
  quadratic ``v^T (X^T X o A^T A) v``, ``A[o, (i, k)] = S[o, i]``) and ``S`` given ``D``; each
  step lowers the error. Last, each channel's scale is balanced, ``||D[i]|| = ||S[:, i]||``.
  Measured on the trained ResNet-20 (Fashion-MNIST, 512 images, groups=2): the mean
  unexplained share is 0.48 after the fit of ``S`` alone, 0.38 with 4 rounds (the default),
  0.37 with 16.

"Unexplained" is ``sum ||y - y_hat||^2 / sum_o ||y_o - mean(y_o)||^2`` over the fitting
images (0: exact; 1: no better than each channel's mean). A bias of the original conv stays
in the target of an SCC layer, which has none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.layers.periodic_sparse import PeriodicSparseConv2d
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = ["fit_layers", "measure_unexplained", "factorise_dw_scc"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # patch-matrix elements per Gram update (32 MiB in float64)


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is captured."""


@dataclass
class _Moments:
    """Moments of one layer's regressors ``X [rows, F]`` and target ``Y [rows, O]`` (float64)."""

    gram: Tensor  # X^T X [F, F]
    cross: Tensor  # X^T Y [F, O]
    energy: Tensor  # sum y^2 per output channel [O]
    total: Tensor  # sum y per output channel [O]
    rows: int = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.energy += (y * y).sum(0)
        self.total += y.sum(0)
        self.rows += len(y)

    def unexplained(self, weight: Tensor) -> float:
        """Share of the target's spread that ``X @ weight.T`` leaves (``weight`` [O, F])."""
        left = self.energy.sum() - 2 * (weight * self.cross.T).sum() + ((weight @ self.gram) * weight).sum()
        return _share(float(left), float((self.energy - self.total ** 2 / self.rows).sum()))


def _share(left: float, spread: float) -> float:
    if spread <= 0:
        return 0.0 if left <= 0 else float("inf")
    return max(left, 0.0) / spread


def _padding(path: str, conv: nn.Module) -> tuple[int, int]:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise LeanconvError(f"layer {path}: fitting needs zero padding, not {conv.padding_mode!r}")
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(s % 2 for s in spans):
        raise LeanconvError(f"layer {path}: padding='same' with an even kernel pads unevenly; cannot fit it")
    return tuple(s // 2 for s in spans)


@dataclass
class _Layer:
    """One layer to fit: how to unfold its input, its support and start, how to write it."""

    path: str
    kind: str
    new: nn.Module
    conv: nn.Conv2d
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    intercept: bool = False

    def patches(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N * L, C * kh * kw (+1)]`` in float64."""
        cols = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride).transpose(1, 2)
        cols = cols.reshape(-1, cols.shape[-1]).double()
        return torch.cat([cols, cols.new_ones(len(cols), 1)], 1) if self.intercept else cols


def _layer(path: str, new: nn.Module, conv: nn.Module) -> _Layer:
    if isinstance(new, nn.Sequential) and len(new) == 2 and isinstance(new[1], SlidingChannelConv2d) \
            and isinstance(new[0], nn.Conv2d) and new[0].bias is None \
            and new[0].groups == new[0].in_channels == new[0].out_channels == new[1].in_channels:
        kind, geometry = "dw_scc", new[0]
        spec = (geometry.kernel_size, geometry.stride, _padding(path, geometry), geometry.dilation)
    elif isinstance(new, PeriodicSparseConv2d):
        kind, spec = "psconv", ((3, 3), (new.stride,) * 2, (new.padding,) * 2, (1, 1))
    elif isinstance(new, SlidingChannelConv2d):
        kind, spec = "scc", ((1, 1), (new.stride,) * 2, (0, 0), (1, 1))
    else:
        raise LeanconvError(f"layer {path} of the converted model is a {type(new).__name__}, not a "
                            "PeriodicSparseConv2d, SlidingChannelConv2d or Sequential(depthwise, SCC)")
    scc = new[1] if kind == "dw_scc" else new
    shape = (scc.out_channels, (new[0] if kind == "dw_scc" else new).in_channels, *spec[0])
    if not isinstance(conv, nn.Conv2d) or tuple(conv.weight.shape) != shape:
        raise LeanconvError(f"layer {path} of the original model is a {type(conv).__name__} with weight "
                            f"{list(getattr(conv, 'weight', torch.empty(0)).shape)}; the {kind} layer "
                            f"replacing it needs an nn.Conv2d with weight {list(shape)}")
    return _Layer(path, kind, new, conv, *spec, intercept=kind == "psconv" and new.bias is not None)


def _capture(model: nn.Module, path: str, x: Tensor, output: bool) -> Tensor:
    """The first input (``output=False``) or the output of the module at ``path`` in
    ``model(x)``, ending the forward pass there."""
    module = model.get_submodule(path)
    got = []

    def keep(value: Tensor) -> None:
        got.append(value)
        raise _Reached

    handle = (module.register_forward_hook(lambda _m, _a, out: keep(out)) if output
              else module.register_forward_pre_hook(lambda _m, args: keep(args[0])))
    try:
        model(to_model(x, model))
    except _Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise LeanconvError(f"layer {path} never ran in a forward pass of {type(model).__name__}")
    return got[0]


def _forward_order(model: nn.Module, paths: list[str], x: Tensor) -> list[str]:
    """``paths`` in the order ``model(x)`` calls them; each must run exactly once."""
    calls: list[str] = []
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda _m, _a, p=p: calls.append(p)) for p in paths]
    try:
        model(to_model(x, model))
    finally:
        for h in handles:
            h.remove()
    for path in paths:
        if calls.count(path) != 1:
            raise LeanconvError(f"layer {path} ran {calls.count(path)} times in one forward pass; "
                                "fitting needs each converted layer to run exactly once")
    return calls


def _moments(layer: _Layer, original: nn.Module, converted: nn.Module, batches: list[Tensor]) -> _Moments:
    size = layer.kernel[0] * layer.kernel[1] * layer.conv.in_channels + layer.intercept
    outs, kw = layer.conv.out_channels, {"dtype": torch.float64, "device": layer.conv.weight.device}
    stats = _Moments(torch.zeros(size, size, **kw), torch.zeros(size, outs, **kw),
                     torch.zeros(outs, **kw), torch.zeros(outs, **kw))
    for x in batches:
        inp = _capture(converted, layer.path, x, output=False)
        target = _capture(original, layer.path, x, output=True)
        chunk = max(1, _CHUNK // (size * target[0, 0].numel()))
        for start in range(0, len(x), chunk):
            y = target[start:start + chunk]
            cols = layer.patches(inp[start:start + chunk].to(target.dtype))
            if len(cols) != y.numel() // outs:
                raise LeanconvError(f"layer {layer.path}: the converted layer's input gives {len(cols)} patches "
                                    f"but the original conv has {y.numel() // outs} outputs per channel")
            stats.add(cols, y.transpose(0, 1).reshape(outs, -1).T.double())
    return stats


def _ridge(h: Tensor, rhs: Tensor, prev: Tensor, ridge: float) -> Tensor:
    """``argmin w^T h w - 2 w^T rhs + lam ||w - prev||^2`` (columns of ``rhs``/``prev``)."""
    scale = float(h.diagonal().mean()) if len(h) else 0.0
    lam = ridge * scale if scale > 0 else 1.0
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    return torch.linalg.solve(h + lam * eye, rhs + lam * prev)


def _masked_fit(gram: Tensor, cross: Tensor, support: Tensor, start: Tensor, ridge: float) -> Tensor:
    """Per output ``o``: the ridge fit of ``start[o]`` on the columns ``support[o]`` (bool
    ``[O, F]``); outputs with the same support are solved together. Returns ``[O, F]``."""
    weight = torch.zeros_like(start)
    patterns, which = torch.unique(support.to(torch.uint8), dim=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        outs, cols = (which == g).nonzero().squeeze(1), pattern.nonzero().squeeze(1)
        solved = _ridge(gram[cols][:, cols], cross[cols][:, outs], start[outs][:, cols].T, ridge)
        weight[outs[:, None], cols[None, :]] = solved.T
    return weight


def factorise_dw_scc(weight: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
    """The best ``W[o, i] ~ S[o, i] * D[i]`` in Frobenius norm, ``S`` zero where input ``i`` is not
    in output ``o``'s window (``window``: SCC's ``window_index`` [O, cw]). Separable per input
    channel: a rank-1 SVD of ``W[:, i]`` on the outputs that read ``i``. Returns ``S`` [O, I] and
    ``D`` [I, kh * kw] (float64) with ``||D[i]|| = ||S[:, i]||`` (a unit ``D[i]`` where ``W[:, i]``
    is zero there, so fine-tuning can still grow ``S[:, i]``)."""
    mask = torch.zeros(weight.shape[:2], dtype=torch.float64, device=weight.device).scatter_(1, window, 1.0)
    w = weight.detach().double().flatten(2) * mask[:, :, None]
    u, s, vh = torch.linalg.svd(w.transpose(0, 1), full_matrices=False)  # per input channel [O, K]
    root = s[:, 0].sqrt()
    depth = vh[:, 0] * torch.where(root > 0, root, torch.ones_like(root))[:, None]
    return u[:, :, 0].T * root * mask, depth


def _balance(scale: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
    s_norm, d_norm = scale.norm(dim=0), depth.norm(dim=1)
    c = torch.where((s_norm > 0) & (d_norm > 0), (s_norm / d_norm.clamp_min(1e-300)).sqrt(), torch.ones_like(s_norm))
    return scale / c, depth * c[:, None]


def _fit_dw_scc(layer: _Layer, stats: _Moments, ridge: float, als_steps: int) -> tuple[Tensor, Tensor]:
    depthwise, scc = layer.new[0], layer.new[1]
    scale, depth = factorise_dw_scc(layer.conv.weight, scc.window_index)
    mask = scale.new_zeros(scale.shape).scatter_(1, scc.window_index, 1.0) > 0
    cin, taps, outs = depth.shape[0], depth.shape[1], scale.shape[0]
    gram4, cross3 = stats.gram.view(cin, taps, cin, taps), stats.cross.view(cin, taps, outs)

    def dense(s: Tensor, d: Tensor) -> Tensor:
        return (s[:, :, None] * d[None]).reshape(outs, -1)

    start = dense(scale, depth)
    for step in range(als_steps + 1):
        if step:  # D given S: v^T (G o A^T A) v - 2 v^T sum_o a_o o X^T y_o
            a = scale.repeat_interleave(taps, dim=1)
            rhs = (a * stats.cross.T).sum(0, keepdim=True).T
            depth = _ridge(stats.gram * (a.T @ a), rhs, depth.reshape(-1, 1), ridge).view(cin, taps)
        gram_z = torch.einsum("ik,ikjl,jl->ij", depth, gram4, depth)
        scale = _masked_fit(gram_z, torch.einsum("ik,iko->io", depth, cross3), mask, scale, ridge)
    scale, depth = _balance(scale, depth)
    depthwise.weight.copy_(depth.view_as(depthwise.weight))
    scc.weight.copy_(scale.gather(1, scc.window_index))
    return start, dense(scale, depth)


def _fit_sparse(layer: _Layer, stats: _Moments, ridge: float) -> tuple[Tensor, Tensor]:
    """``psconv`` and ``scc``: a masked fit from the trained weights on the support."""
    new, trained = layer.new, layer.conv.weight.detach().double().flatten(1)
    if layer.kind == "psconv":
        support = torch.zeros(trained.numel(), dtype=torch.bool, device=trained.device)
        support = support.scatter(0, new.nz_index, True).view_as(trained)
    else:
        support = torch.zeros_like(trained, dtype=torch.bool).scatter(1, new.window_index, True)
    if layer.intercept:
        bias = layer.conv.bias.detach().double()[:, None] if layer.conv.bias is not None \
            else trained.new_zeros(len(trained), 1)
        trained = torch.cat([trained, bias], 1)
        support = torch.cat([support, support.new_ones(len(support), 1)], 1)
    start = trained * support
    weight = _masked_fit(stats.gram, stats.cross, support, start, ridge)
    if layer.kind == "psconv":
        new.weight_nz.copy_(weight[:, :-1].reshape(-1)[new.nz_index] if layer.intercept
                            else weight.reshape(-1)[new.nz_index])
        if layer.intercept:
            new.bias.copy_(weight[:, -1])
    else:
        new.weight.copy_(weight.gather(1, new.window_index))
    return start, weight


def _batches(images: Iterable[Tensor] | Tensor, batch_size: int) -> list[Tensor]:
    batches = list(images.split(batch_size)) if torch.is_tensor(images) else \
        [b if torch.is_tensor(b) else b[0] for b in images]
    if not batches or not all(torch.is_tensor(b) and b.dim() == 4 and len(b) for b in batches):
        raise LeanconvError("fitting needs images: a [N, C, H, W] tensor or batches of them")
    return batches


@torch.no_grad()
def fit_layers(original: nn.Module, converted: nn.Module, paths: list[str], images: Iterable[Tensor] | Tensor, *,
               progress: Progress | None = None, ridge: float = 1e-4, als_steps: int = 4,
               batch_size: int = 128) -> dict[str, dict]:
    """Set the weights of ``converted``'s new layers at ``paths`` by the fits of the module
    docstring, in forward order; ``original`` is the model before :func:`convert` and is not
    changed. ``images``: a ``[N, C, H, W]`` tensor (cut into ``batch_size`` batches) or an
    iterable of image batches or ``(images, labels)`` batches, held in memory (a few hundred
    images suffice). Both models run in eval mode; each module's mode is restored.

    Returns, per path in forward order: ``kind`` (``"psconv"``, ``"scc"`` or ``"dw_scc"``),
    ``unexplained`` after the fit and ``unexplained_start`` before it (pSConv: the trained
    taps kept on the pattern; SCC: the trained 1x1 weights on the windows; DW + SCC: the
    weight-space factorisation). ``progress(done, total, info)`` is called after each layer.
    """
    batches = _batches(images, batch_size)
    results: dict[str, dict] = {}
    with eval_mode(original), eval_mode(converted):
        order = _forward_order(converted, list(paths), batches[0][:1])
        layers = [_layer(p, converted.get_submodule(p), original.get_submodule(p)) for p in order]
        for done, layer in enumerate(layers, 1):
            stats = _moments(layer, original, converted, batches)
            start, weight = _fit_dw_scc(layer, stats, ridge, als_steps) if layer.kind == "dw_scc" \
                else _fit_sparse(layer, stats, ridge)
            results[layer.path] = {"kind": layer.kind, "unexplained": stats.unexplained(weight),
                                   "unexplained_start": stats.unexplained(start)}
            log.info("fitted %s (%s): unexplained %.4f, start %.4f", layer.path, layer.kind,
                     results[layer.path]["unexplained"], results[layer.path]["unexplained_start"])
            if progress is not None:
                progress(done, len(layers), {"layer": layer.path, "unexplained": results[layer.path]["unexplained"]})
    return results


@torch.no_grad()
def measure_unexplained(original: nn.Module, converted: nn.Module, paths: list[str],
                        images: Iterable[Tensor] | Tensor, *, batch_size: int = 128) -> dict[str, float]:
    """Per path, the share of the original conv's output spread that ``converted``'s layer at
    the same path leaves unexplained on ``images`` (each model on its own inputs), without
    fitting: on the fitting images this is what :func:`fit_layers` reports, on held-out images
    it shows how well the fit carries over. Both models run in eval mode; modes are restored."""
    sums: dict[str, list] = {p: [0.0, 0.0, 0.0, 0] for p in paths}  # residual^2, y^2, (sum y)^2 per channel
    with eval_mode(original), eval_mode(converted):
        for x in _batches(images, batch_size):
            want, got = _outputs(original, paths, x), _outputs(converted, paths, x)
            for p in paths:
                if want[p].shape != got[p].shape:
                    raise LeanconvError(f"layer {p}: output {list(got[p].shape)} in the converted model, "
                                        f"{list(want[p].shape)} in the original")
                y = want[p].double().transpose(0, 1).flatten(1)
                acc = sums[p]
                acc[0] += float(((got[p].double().transpose(0, 1).flatten(1) - y) ** 2).sum())
                acc[1], acc[2], acc[3] = acc[1] + (y * y).sum(1), acc[2] + y.sum(1), acc[3] + y.shape[1]
    return {p: _share(left, float((sq - tot ** 2 / n).sum())) for p, (left, sq, tot, n) in sums.items()}


def _outputs(model: nn.Module, paths: list[str], x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, list[Tensor]] = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _a, out, p=p: seen[p].append(out))
               for p in paths]
    try:
        model(to_model(x, model))
    finally:
        for h in handles:
            h.remove()
    for p, outs in seen.items():
        if len(outs) != 1:
            raise LeanconvError(f"layer {p} ran {len(outs)} times in one forward pass; measuring needs exactly once")
    return {p: outs[0] for p, outs in seen.items()}
