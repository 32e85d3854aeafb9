"""Where a new conv pays, and in which form: each candidate layer timed against the conv it replaces.

A sliding-channel block or a periodic sparse conv does fewer multiply-adds than the dense conv
it replaces, but whether it runs faster depends on the runtime, the layer's shape and the
batch: at 16 channels fixed costs dominate, and a runtime without sparse kernels runs a pSConv
as a dense conv with a masked weight. Each new layer has several exact forms (``impl``): the
compiled sparse kernels (PyTorch only), the masked dense conv (``reference``), and a grouped
decomposition (``grouped``: pSConv as a sum of dense grouped convs, SCC as one grouped 1x1
conv on gathered windows), the last two exportable to ONNX. A pSConv's masked dense form is
the replaced conv itself (it can only tie, and a measured "gain" would be noise), so only its
other forms are candidates; where it has none (no grouped form, not PyTorch) it stays dense.

:func:`measure_layers` builds, for every layer the placement rules of
:mod:`leanconv.convs.convert` pick, the replacement in each form the runtime can run
(:func:`forms`) and a copy of the original conv, and times them side by side
(:func:`leanconv.cost.side_by_side.time_side_by_side`: interleaved rounds, on the runtime,
threads and batch given) at the input shape the layer sees in the model. Each layer's fastest
form and its time ratio to the dense conv are kept. :func:`choose` keeps the layers whose
fastest form is faster than dense by a margin, and :func:`set_forms` gives each converted
layer its fastest form.

A layer timed alone is not the same as a layer inside a graph (a runtime may convert layouts
around a lone conv, fuse BatchNorm into one form and not another, or pay a per-call cost once
per graph rather than once per layer), so :func:`confirm` times the whole model with the
chosen layers converted side by side with the original, and drops the half that gained least
alone until the model is faster by the margin. ``leanconv convert --where auto`` does all
three; the speedup a record states is the final model timed side by side with the original.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from leanconv.cost.runtimes import prepare
from leanconv.cost.side_by_side import time_side_by_side
from leanconv.errors import LeanconvError
from leanconv.layers._kernels import kernels_available
from leanconv.layers.periodic_sparse import PeriodicSparseConv2d, has_grouped_form
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.util import checks
from leanconv.util.modes import eval_mode
from leanconv.util.progress import Progress

__all__ = ["LayerTiming", "layer_input_shapes", "forms", "with_form", "set_form", "measure_layers", "set_forms",
           "choose", "confirm", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 0.05  # convert a layer only when its new form takes at most 95% of the dense conv's time


@dataclass(frozen=True)
class LayerTiming:
    """One candidate layer, timed alone: the dense conv and its replacement in every form,
    side by side. ``form`` is the fastest form; ``ratio`` its time over the dense conv's
    (median over rounds, with the extreme rounds as ``low`` and ``high``; below 1 it is
    faster); ``forms`` every form's median ratio."""

    path: str
    input_shape: tuple[int, ...]
    dense_ms: float | None  # None: not timed (no form could beat the dense conv here)
    new_ms: float | None
    ratio: dict[str, float]
    form: str = "auto"
    forms: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape)}


def _new_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (PeriodicSparseConv2d, SlidingChannelConv2d))]


def forms(module: nn.Module, runtime: str) -> list[str]:
    """The exact forms (``impl`` values) of the new layer in ``module`` that could beat the
    conv it replaces on ``runtime``: the compiled kernels in PyTorch only (where they are
    built) and the grouped decomposition everywhere (pSConv: where the channels are multiples
    of the period); for SCC also the masked dense 1x1 conv. A pSConv's masked dense form is the
    replaced conv itself and is not a candidate. May be empty."""
    layers = _new_layers(module)
    if len(layers) != 1:
        raise LeanconvError(f"expected one new layer in {type(module).__name__}, found {len(layers)}")
    layer = layers[0]
    if isinstance(layer, PeriodicSparseConv2d):
        # its reference form is the replaced conv itself (a masked weight of the same shape): it can only
        # tie, so a measured gain would be noise
        found = ["grouped"] if has_grouped_form(layer.in_channels, layer.out_channels, layer.pattern) else []
        kernel_ok = layer.stride in (1, 2) and layer.padding <= 2
    else:
        found = ["reference", "grouped"]
        kernel_ok = True
    if runtime == "torch" and kernel_ok and kernels_available():
        found.append("kernel")
    return found


def with_form(module: nn.Module, form: str) -> nn.Module:
    """A copy of ``module`` whose new layer runs in ``form``."""
    copied = copy.deepcopy(module)
    set_form(copied, form)
    return copied


def set_form(module: nn.Module, form: str) -> None:
    """Make the new layer(s) in ``module`` run in ``form`` (an ``impl`` value), in place."""
    for layer in _new_layers(module):
        layer.impl = form


def layer_input_shapes(model: nn.Module, paths: Sequence[str],
                       input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The shape (without batch) of the input each layer at ``paths`` receives, from one
    forward pass of a single zero image."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for path in paths:
        def hook(_module, inputs, path=path):
            shapes.setdefault(path, tuple(inputs[0].shape[1:]))
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32)
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in shapes]
    if missing:
        raise LeanconvError(f"layer {missing[0]} is not called by the model's forward pass; it cannot be timed "
                            "in place")
    return shapes


def measure_layers(model: nn.Module, replacements: dict[str, nn.Module], input_shape: Sequence[int], *,
                   runtime: str, threads: int = 1, batch: int = 1, rounds: int = 5, repeats: int = 10,
                   progress: Progress | None = None) -> list[LayerTiming]:
    """Each layer of ``model`` at a path of ``replacements`` timed side by side with its
    replacement in every form ``runtime`` can run (:func:`forms`), at the layer's own input
    shape; ``model`` is not changed."""
    shapes = layer_input_shapes(model, list(replacements), input_shape)
    timings = []
    for i, (path, new) in enumerate(replacements.items()):
        dense = copy.deepcopy(model.get_submodule(path)).float()
        candidates = {form: with_form(new, form).float() for form in forms(new, runtime)}
        if not candidates:  # nothing that could be faster here: recorded untimed, as a tie, never chosen
            timings.append(LayerTiming(path, shapes[path], None, None, {"median": 1.0, "low": 1.0, "high": 1.0},
                                       "reference", {}))
        else:
            timings.append(_timed(path, shapes[path], dense, candidates, runtime, threads, batch, rounds, repeats))
        if progress is not None:
            progress(i + 1, len(replacements), {"layer": path})
    return timings


def _timed(path, shape, dense, candidates, runtime, threads, batch, rounds, repeats) -> LayerTiming:
    side = time_side_by_side({"dense": dense, **candidates}, shape, runtime=runtime, threads=threads, batch=batch,
                             rounds=rounds, repeats=repeats, warmup=3)
    best = min(candidates, key=lambda f: side.ratio[f]["median"])
    return LayerTiming(path, shape, side.latency_ms["dense"]["median_ms"], side.latency_ms[best]["median_ms"],
                       side.ratio[best], best, {f: side.ratio[f]["median"] for f in candidates})


def set_forms(model: nn.Module, timings: Sequence[LayerTiming]) -> None:
    """Give each converted layer of ``model`` at a timed path its fastest form."""
    for t in timings:
        module = model.get_submodule(t.path)
        if _new_layers(module):
            set_form(module, t.form)


def confirm(model: nn.Module, spec, timings: Sequence[LayerTiming], chosen: Sequence[str],
            input_shape: Sequence[int], *, runtime: str, threads: int = 1, batch: int = 1,
            margin: float = DEFAULT_MARGIN, rounds: int = 5, repeats: int = 10) -> tuple[list[str], list[dict]]:
    """The layers of ``chosen`` that make the *whole* model faster, and every check made.

    A layer faster alone can still slow the model (a layout change or an unfused operation
    it causes next to it), so the model with the chosen layers converted, each in its fastest
    form, is timed side by side with ``model`` (``spec`` is the conversion). While it is not
    faster by ``margin``, the half of the layers that gained least alone is dropped and the
    rest timed again; ``[]`` when no set is faster. ``model`` is prepared for the runtime once
    (an ONNX export and a session) and timed beside every candidate. Weights do not matter for
    speed: the copies are converted with fresh layers and ``model`` is not changed."""
    from leanconv.convs.convert import convert  # the conversion itself lives beside; placement only times

    gain = {t.path: t.ratio["median"] for t in timings}
    paths = sorted(chosen, key=gain.get)
    checks = []
    dense = prepare(model, input_shape, runtime=runtime, threads=threads, batch=batch) if paths else None
    while paths:
        with torch.random.fork_rng(devices=[]):
            candidate = convert(copy.deepcopy(model), spec.to, groups=spec.groups, overlap=spec.overlap,
                                pattern=spec.pattern, layers=paths)
        set_forms(candidate, [t for t in timings if t.path in paths])
        side = time_side_by_side({"dense": dense, "converted": candidate}, input_shape, runtime=runtime,
                                 threads=threads, batch=batch, rounds=rounds, repeats=repeats, warmup=3)
        ratio = side.ratio["converted"]
        checks.append({"layers": list(paths), "ratio": ratio})
        if ratio["median"] <= 1 - margin:
            return list(paths), checks
        paths = paths[: len(paths) // 2]
    return [], checks


def choose(timings: Sequence[LayerTiming], margin: float = DEFAULT_MARGIN) -> list[str]:
    """Paths whose fastest form is measured faster by ``margin``: median ratio <= 1 - margin."""
    checks.number(margin, "margin", at_least=0, below=1)
    return [t.path for t in timings if t.forms and t.ratio["median"] <= 1 - margin]
