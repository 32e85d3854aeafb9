"""Fitted Neural Implants: start each 1x1 implant as the best linear stand-in for its filters.

HAP's Neural Implant starts the 1x1 filters at zero and lets fine-tuning grow them (the
default, ``implant_init="zero"``). With ``implant_init="fit"`` (our option) each implant
starts instead as the ridge least-squares map from the pruned layer's inputs (the centre tap
of every output position) to what the *original* layer's replaced filters produced on the
same images, so the implanted channel carries on roughly where its kxk filter left off.

Per implanted layer, with ``X`` the implant's inputs (rows: images x output positions,
columns: kept input channels) and ``Y`` the replaced channels of the original conv (its bias
taken off: the implant keeps the original bias entries), the implant weight is
``A = (X^T X + lam I)^-1 X^T Y`` with ``lam = ridge * mean(diag(X^T X))``, solved in float64.
Layers are fitted one at a time in model order, each on the pruned model's current outputs,
so a later implant sees the earlier ones already fitted. Data: the scoring batches (the
validation split, never the test split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from leanconv.errors import LeanconvError
from leanconv.layers.implant import ImplantConv2d
from leanconv.util.model_io import to_model
from leanconv.util.modes import eval_mode

__all__ = ["fit_implants", "IMPLANT_INITS"]

IMPLANT_INITS = ("zero", "fit")


def _run_with_hooks(model: nn.Module, modules: Mapping[str, nn.Module], x: Tensor, what: str) -> dict[str, Tensor]:
    """Per path: the module's input (``what="input"``) or output during one ``model(x)``."""
    seen: dict[str, list[Tensor]] = {path: [] for path in modules}
    handles = [m.register_forward_hook(lambda _m, args, out, path=path: seen[path].append(
        args[0] if what == "input" else out)) for path, m in modules.items()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    for path, calls in seen.items():
        if len(calls) != 1:
            raise LeanconvError(f"--implant-init fit needs {path} to run once per forward pass, but it ran "
                                f"{len(calls)} times; use --implant-init zero")
    return {path: calls[0] for path, calls in seen.items()}


def _rows(t: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[C, N*H*W]`` in float64."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).double()


@torch.no_grad()
def fit_implants(
    pruned: nn.Module,
    original: nn.Module,
    targets: Mapping[str, Sequence[int]],
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    ridge: float = 1e-3,
) -> dict[str, float]:
    """Set the implant weights of ``pruned``'s :class:`ImplantConv2d` layers (module docstring).

    ``targets[path]`` lists, in the implant's output order, the output channels of
    ``original``'s conv at the same ``path`` that the implant stands in for. Returns, per
    path, the share of the targets' sum of squares the fitted implant leaves unexplained,
    averaged over its channels (0 = exact, 1 = no better than the zero implant). Both models
    run in eval mode; neither mode is changed.
    """
    paths = [p for p, _ in pruned.named_modules() if p in targets]
    layers = {p: pruned.get_submodule(p) for p in paths}
    for path, layer in layers.items():
        if not isinstance(layer, ImplantConv2d) or len(targets[path]) != layer.implant.out_channels:
            raise RuntimeError(f"leanconv bug: {path} is not an implant of {len(targets[path])} channels")
    inputs = [to_model(x, pruned) for x, _ in batches]
    with eval_mode(pruned), eval_mode(original):
        wanted = []  # per batch, per path: the replaced channels' outputs, bias taken off, [C, rows]
        for x in inputs:
            outs = _run_with_hooks(original, {p: original.get_submodule(p) for p in paths}, x, "output")
            wanted.append({})
            for path, out in outs.items():
                conv, channels = original.get_submodule(path), list(targets[path])
                y = out[:, channels]
                wanted[-1][path] = _rows(y if conv.bias is None else y - conv.bias[channels].view(1, -1, 1, 1))
        residual = {}
        for path, layer in layers.items():  # in model order: later layers see earlier fits
            gram = xty = 0
            for x, want in zip(inputs, wanted):
                feats = _rows(layer.centre_inputs(_run_with_hooks(pruned, {path: layer}, x, "input")[path]))
                gram, xty = gram + feats @ feats.T, xty + feats @ want[path].T
            lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
            a = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), xty)
            layer.implant.weight.copy_(a.T.reshape(layer.implant.weight.shape))
            energy = sum((want[path] ** 2).sum(1) for want in wanted)
            left = (energy - 2 * (a * xty).sum(0) + (a * (gram @ a)).sum(0)).clamp_min(0)
            residual[path] = float((left / energy.clamp_min(1e-12)).mean())
    return residual
