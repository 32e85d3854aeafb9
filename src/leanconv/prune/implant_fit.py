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

from leanconv.layers.implant import ImplantConv2d
from leanconv.modes import eval_mode

__all__ = ["fit_implants", "IMPLANT_INITS"]

IMPLANT_INITS = ("zero", "fit")


def _capture(model: nn.Module, module: nn.Module, x: Tensor, what: str) -> Tensor:
    """``module``'s input (``what="input"``) or output during ``model(x)``."""
    seen: list[Tensor] = []

    def hook(_m, args, out):
        seen.append(args[0] if what == "input" else out)

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"leanconv bug: the implanted layer ran {len(seen)} times in one forward pass")
    return seen[0]


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
    residual = {}
    with eval_mode(pruned), eval_mode(original):
        for path in [p for p, _ in pruned.named_modules() if p in targets]:
            layer = pruned.get_submodule(path)
            conv = original.get_submodule(path)
            if not isinstance(layer, ImplantConv2d) or len(targets[path]) != layer.implant.out_channels:
                raise RuntimeError(f"leanconv bug: {path} is not an implant of {len(targets[path])} channels")
            channels = torch.as_tensor(list(targets[path]))
            gram = xty = None
            ys = []
            device = layer.implant.weight.device
            for x, _ in batches:
                x = x.to(device)
                feats = layer.centre_inputs(_capture(pruned, layer, x, "input"))
                y = _capture(original, conv, x, "output")[:, channels]
                if conv.bias is not None:
                    y = y - conv.bias[channels].view(1, -1, 1, 1)
                f2 = feats.transpose(0, 1).reshape(feats.shape[1], -1).double()
                y2 = y.transpose(0, 1).reshape(y.shape[1], -1).double()
                gram = f2 @ f2.T if gram is None else gram + f2 @ f2.T
                xty = f2 @ y2.T if xty is None else xty + f2 @ y2.T
                ys.append(y2)
            lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
            a = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xty)
            layer.implant.weight.copy_(a.T.reshape(layer.implant.weight.shape))
            y_all = torch.cat(ys, dim=1)
            fitted = ((y_all ** 2).sum(1) - 2 * (a * xty).sum(0) + (a * (gram @ a)).sum(0)).clamp_min(0)
            residual[path] = float((fitted / (y_all ** 2).sum(1).clamp_min(1e-12)).mean())
    return residual
