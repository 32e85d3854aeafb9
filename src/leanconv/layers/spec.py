"""Module specs: a module's type and constructor arguments as plain JSON.

A checkpoint stores a model as a base constructor plus a list of structural edits; each
edit puts a module built from a *spec* at a path. A spec is
``{"type": NAME, "kwargs": {...}}`` (plus ``"children": [spec, ...]`` for ``Sequential``)
and names only types registered here: a handful of ``torch.nn`` layers and leanconv's own
layers. Nothing outside this table can ever be built from a file, so a checkpoint cannot
make leanconv import or run foreign code.

A leanconv layer joins the table with :func:`register_layer` and implements
``spec_kwargs(self) -> dict``, returning the keyword arguments that rebuild it with the
same shapes (weights are loaded separately).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from leanconv.errors import LeanconvError

__all__ = ["register_layer", "layer_types", "module_to_spec", "module_from_spec", "is_registered"]


def _conv_kwargs(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _bn_kwargs(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _pool_kwargs(m: nn.Module) -> dict[str, Any]:
    keys = ("kernel_size", "stride", "padding", "ceil_mode")
    return {k: getattr(m, k) for k in keys if hasattr(m, k)}


# Built-in torch layers that may appear in an edit: name -> (class, kwargs extractor).
_TORCH_TYPES: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "Conv2d": (nn.Conv2d, _conv_kwargs),
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_kwargs),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_kwargs),
    "Identity": (nn.Identity, lambda m: {}),
    "ReLU": (nn.ReLU, lambda m: {"inplace": m.inplace}),
    "ReLU6": (nn.ReLU6, lambda m: {"inplace": m.inplace}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": m.output_size}),
    "MaxPool2d": (nn.MaxPool2d, _pool_kwargs),
    "AvgPool2d": (nn.AvgPool2d, _pool_kwargs),
    "Sequential": (nn.Sequential, lambda m: {}),
}

# leanconv's own layers, added by register_layer.
_LEANCONV_TYPES: dict[str, type] = {}


def register_layer(cls: type) -> type:
    """Class decorator: allow ``cls`` in checkpoint edits. It must define ``spec_kwargs``."""
    name = cls.__name__
    if name in _TORCH_TYPES or (name in _LEANCONV_TYPES and _LEANCONV_TYPES[name] is not cls):
        raise ValueError(f"layer type name {name!r} is already registered")
    if not callable(getattr(cls, "spec_kwargs", None)):
        raise TypeError(f"{name} must define spec_kwargs() to be registered")
    _LEANCONV_TYPES[name] = cls
    return cls


def layer_types() -> list[str]:
    """Names of every type a spec may name."""
    return sorted([*_TORCH_TYPES, *_LEANCONV_TYPES])


def _type_name(module: nn.Module) -> str | None:
    cls = type(module)
    for name, (torch_cls, _) in _TORCH_TYPES.items():
        if cls is torch_cls:
            return name
    for name, own in _LEANCONV_TYPES.items():
        if cls is own:
            return name
    return None


def is_registered(module: nn.Module) -> bool:
    """True when ``module``'s exact type can be written as a spec."""
    return _type_name(module) is not None


def module_to_spec(module: nn.Module, path: str = "") -> dict[str, Any]:
    """Describe ``module`` (and, for ``Sequential``, its children) as a JSON-able spec."""
    name = _type_name(module)
    if name is None:
        where = f" at {path!r}" if path else ""
        raise LeanconvError(
            f"module{where} of type {type(module).__name__} is not a leanconv layer type and cannot "
            "be stored as a checkpoint edit; use one of: " + ", ".join(layer_types())
        )
    if name in _TORCH_TYPES:
        kwargs = _TORCH_TYPES[name][1](module)
    else:
        kwargs = module.spec_kwargs()
    spec: dict[str, Any] = {"type": name, "kwargs": kwargs}
    if name == "Sequential":
        spec["children"] = [
            module_to_spec(child, f"{path}.{key}" if path else key) for key, child in module.named_children()
        ]
    return spec


def module_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Build a fresh module (random weights) from a spec made by :func:`module_to_spec`.
    A spec that is not of that shape, or whose arguments the layer refuses, is one
    :class:`LeanconvError` calling the checkpoint corrupt."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) \
            or not isinstance(spec.get("kwargs", {}), dict) or not isinstance(spec.get("children", []), list):
        raise LeanconvError(f"malformed layer spec {_brief(spec)}; the checkpoint is corrupt")
    name = spec["type"]
    kwargs = dict(spec.get("kwargs", {}))
    if name == "Sequential":
        return nn.Sequential(*[module_from_spec(c) for c in spec.get("children", [])])
    if name in _TORCH_TYPES:
        cls = _TORCH_TYPES[name][0]
    elif name in _LEANCONV_TYPES:
        cls = _LEANCONV_TYPES[name]
    else:
        raise LeanconvError(f"checkpoint names unknown layer type {_brief(name)}; it was written by a newer "
                            "leanconv or is corrupt")
    for key in ("kernel_size", "stride", "padding", "dilation", "output_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except (LeanconvError, TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        # RuntimeError: e.g. a negative channel count; MemoryError: a layer too large to allocate
        raise LeanconvError(f"cannot build layer {name} from checkpoint arguments {_brief(kwargs)} "
                            f"({' '.join(str(exc).split())[:200]}); "
                            "the checkpoint is corrupt") from exc


def _brief(value: Any) -> str:
    """``repr(value)`` cut to 200 characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
