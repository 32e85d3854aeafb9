"""The dataset registry: ``load_dataset(name, data_dir=None, **options) -> DatasetSplits``.

Names are ``fashion-mnist``, ``cifar10``, ``cifar100``, ``synthetic``, and a user's own data:
``imagefolder:PATH`` (a folder per class of image files) and ``npz:PATH`` (arrays in a
``.npz`` file); case and ``_`` versus ``-`` do not matter. Options may be passed as keyword
arguments or appended to the name, ``"synthetic:n=512,c=3,s=16,k=4"``; keyword arguments win. Every dataset accepts
``val_size`` and ``flip_ok``; see each module for its own options. :func:`check_dataset_spec`
checks a spec's name and the ranges of its options without loading anything (the command
line does so before any work). The returned
``DatasetSplits.name`` is canonical (``name:key=value,...`` with the options given), so
``load_dataset(splits.name, data_dir)`` loads the same data again.

Parsed datasets are cached in-process (keyed by name, resolved directory and options), so
repeated loads cost nothing; their tensors are shared and must be treated as read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable

from leanconv.data.cifar import load_cifar10, load_cifar100
from leanconv.data.fashion_mnist import load_fashion_mnist
from leanconv.data.imagefolder import load_imagefolder
from leanconv.data.npz import load_npz
from leanconv.data.splits import DatasetSplits
from leanconv.data.splits import user_data_options
from leanconv.data.synthetic import check_synthetic_options, load_synthetic
from leanconv.errors import LeanconvError
from leanconv.util.checks import brief
from leanconv.util.limits import MAX_PATH_BYTES, MAX_SIDE

__all__ = ["dataset_names", "dataset_takes", "parse_dataset_name", "check_dataset_spec", "load_dataset", "clear_cache"]

_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "fashion-mnist": load_fashion_mnist,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
    "synthetic": load_synthetic,
}
_PATH_DATASETS = ("imagefolder", "npz")  # "imagefolder:PATH": the first item without "=" is the path


def dataset_takes(name: str, option: str) -> bool:
    """Whether dataset ``name`` (canonical) has the option ``option`` (e.g. ``size``)."""
    params = inspect.signature(_LOADERS[name]).parameters
    return option in params and params[option].kind is inspect.Parameter.KEYWORD_ONLY


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_LOADERS)


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(lowered)
    except ValueError:
        return text.strip()


def parse_dataset_name(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,..."`` into the canonical name and an options dict."""
    if not isinstance(spec, str) or len(spec) > MAX_PATH_BYTES:
        raise LeanconvError(f"a dataset is named by a text of at most {MAX_PATH_BYTES} characters, got {brief(spec)}")
    base, _, rest = spec.partition(":")
    name = base.strip().lower().replace("_", "-")
    if name in ("cifar-10", "cifar-100"):
        name = name.replace("-", "")
    if name not in _LOADERS:
        raise LeanconvError(f"unknown dataset {brief(base)}; "
                            f"choose one of: {', '.join(dataset_names())}")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq and name in _PATH_DATASETS and "path" not in options:
            options["path"] = item
            continue
        if not eq or not key.strip():
            raise LeanconvError(f"dataset option {brief(item)} in {brief(spec)} must look like key=value")
        options[key.strip()] = _parse_value(value)
    return name, options


def _check_options(name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(_LOADERS[name]).parameters
    allowed = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise LeanconvError(f"dataset {name} has no option {', '.join(unknown)}; "
                            f"its options are: {', '.join(allowed)}")


def check_dataset_spec(name: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """The canonical name and options of dataset spec ``name`` (keyword ``options`` win), the
    options checked against the dataset's ranges (:mod:`leanconv.util.limits`) without reading
    or making any image. A path, and the options that depend on the files, are checked when
    the data is loaded."""
    canonical, parsed = parse_dataset_name(name)
    parsed.update(options)
    _check_options(canonical, parsed)
    if canonical == "synthetic":
        check_synthetic_options(**parsed)
    else:
        max_side = MAX_SIDE if canonical in _PATH_DATASETS else 0
        user_data_options(canonical, size=parsed.get("size"), channels=parsed.get("channels"),
                          val_size=parsed.get("val_size"), flip_ok=parsed.get("flip_ok", True), max_side=max_side)
    return canonical, parsed


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> DatasetSplits:
    """Load dataset ``name`` (see :func:`dataset_names`) from ``data_dir`` or its default place."""
    canonical, parsed = check_dataset_spec(name, **options)
    if parsed.get("path") is not None:  # one folder, one cache entry, one name, wherever it was given from
        parsed["path"] = _absolute(str(parsed["path"]))
    directory = None if data_dir is None else _absolute(data_dir)
    try:
        key = tuple(sorted(parsed.items()))
        hash(key)
    except TypeError:
        raise LeanconvError(f"dataset options must be plain values, got {parsed!r}") from None
    return _load_cached(canonical, directory, key)


def _absolute(path: str | Path) -> str:
    """``path`` absolute with links resolved; a link loop stays as it is (the loader names it)."""
    return os.path.realpath(os.path.expanduser(path))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, directory: str | None, options: tuple[tuple[str, Any], ...]
                 ) -> DatasetSplits:
    splits = _LOADERS[name](directory, **dict(options))
    path = dict(options).get("path")
    words = ([path] if path is not None else []) + [f"{key}={value}" for key, value in options if key != "path"]
    if words:
        name = name + ":" + ",".join(words)
    return dataclasses.replace(splits, name=name)


def clear_cache() -> None:
    """Forget every cached dataset (frees its memory; the next load parses the files again)."""
    _load_cached.cache_clear()
