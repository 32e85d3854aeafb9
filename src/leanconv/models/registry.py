"""The model zoo's registry: ``create(name, **kwargs)`` and ``names()``.

Every model that leanconv builds carries ``model.leanconv_base``, a JSON-able record of how
to build it again (``{"zoo": name, "kwargs": {...}}`` or, for a user's model,
``{"constructor": "package.module:function", "kwargs": {...}}``). The checkpoint format
stores that record and replays it on load.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable

from torch import nn

from leanconv.errors import LeanconvError
from leanconv.util.limits import MAX_CLASSES, MAX_INPUT_CHANNELS, MAX_MODEL_ELEMENTS, MAX_SIDE
from leanconv.util.meta_build import BuildLimit, meta_build

__all__ = [
    "register_model",
    "create",
    "names",
    "from_constructor",
    "resolve_constructor",
    "check_zoo_args",
    "build",
]

log = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: add a model constructor to the zoo under its function name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        log.warning("model %r re-registered; the newer constructor wins", name)
    _MODELS[name] = fn
    return fn


def check_zoo_args(num_classes: int, in_channels: int, input_size: int) -> dict[str, Any]:
    """Validate the arguments every zoo constructor shares (ranges: :mod:`leanconv.util.limits`)
    and return the model's initial ``leanconv_meta`` (``input_shape`` [C, H, W] and ``num_classes``)."""
    for label, value, low, high in (("num_classes", num_classes, 1, MAX_CLASSES),
                                    ("in_channels", in_channels, 1, MAX_INPUT_CHANNELS),
                                    ("input_size", input_size, 8, MAX_SIDE)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise LeanconvError(f"{label} must be a whole number in [{low}, {high}], got {_brief(value)}")
    return {"input_shape": [in_channels, input_size, input_size], "num_classes": num_classes}


def _brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= 60 else text[:57] + "..."


def names() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_MODELS)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` (e.g. ``resnet20``) with keyword arguments such as
    ``num_classes``, ``in_channels`` and ``input_size``."""
    if not isinstance(name, str) or name not in _MODELS:
        raise LeanconvError(f"unknown model {_brief(name)}; choose one of: {', '.join(names())}")
    if set(kwargs) - set(_SHARED):  # model-specific numbers (a width list, a config): learn the size first
        _check_size(name, kwargs)
    try:
        model = _MODELS[name](**kwargs)
    except _BAD_ARGUMENT as exc:  # a misspelt keyword, a value of the wrong kind
        raise LeanconvError(f"bad arguments for model {name!r}: {' '.join(str(exc).split())[:200]}") from exc
    model.leanconv_base = {"zoo": name, "kwargs": dict(kwargs)}
    return model


_SHARED = ("num_classes", "in_channels", "input_size")
_BAD_ARGUMENT = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, ZeroDivisionError,
                 OverflowError, RecursionError)


def _check_size(name: str, kwargs: dict[str, Any]) -> None:
    """Build zoo model ``name`` on the meta device (no memory) and refuse it when it would hold
    more than ``MAX_MODEL_ELEMENTS`` parameters and buffers."""
    try:
        meta_build(lambda: _MODELS[name](**kwargs), max_elements=MAX_MODEL_ELEMENTS)
    except BuildLimit as exc:
        raise LeanconvError(f"model {name!r} with {_brief(kwargs)} would hold over {exc}; use smaller "
                            "arguments") from None
    except (LeanconvError, *_BAD_ARGUMENT):
        return  # the real build reports it


def resolve_constructor(target: str) -> Callable[..., nn.Module]:
    """Import ``package.module:function`` and return the function. Only called when a user names
    the constructor explicitly (never because a file says so)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise LeanconvError(f"constructor {target!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise LeanconvError(f"cannot import {module_name!r} for constructor {target!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LeanconvError(f"{module_name!r} has no callable {attr!r}")
    return fn


def from_constructor(target: str | Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Build a user model from ``package.module:function`` (or the function itself) and tag it so
    that checkpoints can record it."""
    fn = resolve_constructor(target) if isinstance(target, str) else target
    name = target if isinstance(target, str) else f"{fn.__module__}:{fn.__qualname__}"
    try:
        model = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor may fail in any way
        raise LeanconvError(f"constructor {name!r} failed with {kwargs or 'no arguments'}: "
                            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise LeanconvError(f"constructor {name!r} returned {type(model).__name__}, not an nn.Module")
    model.leanconv_base = {"constructor": name, "kwargs": dict(kwargs)}
    model.leanconv_constructor = fn  # in memory only: lets checkpoint.save rebuild the base it diffs against
    return model


def build(name: str, kwargs: dict[str, Any] | None = None, **zoo_kwargs: Any) -> nn.Module:
    """A zoo model by ``name``, or a user's ``package.module:function`` given ``kwargs`` as they
    are and those of the zoo's arguments (``num_classes``, ``in_channels``, ``input_size``) that
    it accepts and ``kwargs`` does not set."""
    if name in _MODELS:
        return create(name, **{**zoo_kwargs, **(kwargs or {})})
    if ":" not in name:
        raise LeanconvError(f"unknown model {name!r}; zoo models: {', '.join(names())}, or give "
                            "package.module:function")
    fn = resolve_constructor(name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fitting = {k: v for k, v in zoo_kwargs.items() if takes_all or k in params}
    return from_constructor(name, **{**fitting, **(kwargs or {})})
