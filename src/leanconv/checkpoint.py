"""Checkpoints that hold pruned and re-layered models without pickle.

One ``.safetensors`` file per model. The tensors are the state dict; the metadata header
key ``leanconv`` holds JSON::

    {"format": 1,
     "base":  {"zoo": "resnet20", "kwargs": {...}}           # or {"constructor": "pkg.mod:fn", ...}
     "edits": [{"op": "resize", "path": "layer1.0.conv1", "module": SPEC}, ...],
     "meta":  {"input_shape": [1, 28, 28], "dataset": {...}, "train": {...}, ...}}

Loading builds the base model, replays the edits in order (each puts a module built from
its spec at its path) and loads the weights strictly. Specs only name types from
``leanconv.layers.spec``, and a user constructor is used only when the caller passes it:
the file alone can never make leanconv import or call foreign code.

``save`` finds the edits itself by comparing the model with a freshly built base, so any
structural change made in place (the pruning engine, a layer swap, a block bypass) is
captured without bookkeeping.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import nn

from leanconv.checkpoint_header import MAX_ACTIVATION, check_fits, corrupt, leanconv_header, read_index
from leanconv.errors import LeanconvError
from leanconv.util.files import atomic_write, os_error
from leanconv.layers.spec import is_registered, module_from_spec, module_to_spec
from leanconv.models.registry import create, from_constructor
from leanconv.util.inputs import input_file
from leanconv.util.limits import MAX_MODEL_ELEMENTS
from leanconv.util.meta_build import BuildLimit, meta_build, meta_run

__all__ = ["save", "load", "read_header", "find_edits", "apply_edits", "build_base", "read_weights", "load_weights",
           "constructor_name"]

FORMAT = 1


def build_base(base: dict[str, Any], constructor: Callable[..., nn.Module] | str | None = None) -> nn.Module:
    """Build the unedited model a checkpoint starts from, leaving the caller's random stream
    as it was (initialising the base draws random weights that are overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return _build_base(base, constructor)


def _build_base(base: dict[str, Any], constructor: Callable[..., nn.Module] | str | None) -> nn.Module:
    if not isinstance(base, dict) or not isinstance(base.get("kwargs", {}), dict):
        raise LeanconvError("checkpoint has a malformed base model record; the file is corrupt")
    kwargs = dict(base.get("kwargs", {}))
    if "zoo" in base:
        return create(base["zoo"], **kwargs)
    if "constructor" in base:
        if constructor is None:
            raise LeanconvError(
                f"this checkpoint was built from the user constructor {base['constructor']!r}; pass it "
                "explicitly (load(path, constructor=...) or --constructor) to load it"
            )
        return from_constructor(constructor, **kwargs)
    raise LeanconvError("checkpoint has no base model record; the file is corrupt")


def _diff(base: nn.Module, model: nn.Module, path: str, edits: list[dict]) -> None:
    """Append the edits that turn ``base`` into ``model`` below ``path``."""
    if type(base) is not type(model):
        op = "identity" if isinstance(model, nn.Identity) else "replace"
        edits.append({"op": op, "path": path, "module": module_to_spec(model, path)})
        return
    if is_registered(model) and not isinstance(model, nn.Sequential):
        spec = module_to_spec(model, path)
        if spec != module_to_spec(base, path):
            edits.append({"op": "resize", "path": path, "module": spec})
        return
    base_children, children = dict(base.named_children()), dict(model.named_children())
    if base_children.keys() != children.keys():
        if isinstance(model, nn.Sequential):  # a Sequential whose length changed
            edits.append({"op": "replace", "path": path, "module": module_to_spec(model, path)})
            return
        raise LeanconvError(
            f"module {path or 'model'!r} ({type(model).__name__}) gained or lost sub-modules; replace "
            "the whole module with leanconv layer types to make the change storable"
        )
    for name, child in children.items():
        _diff(base_children[name], child, f"{path}.{name}" if path else name, edits)


def find_edits(model: nn.Module, base: nn.Module) -> list[dict]:
    """The structural edits that turn ``base`` into ``model`` (shapes and types only)."""
    edits: list[dict] = []
    _diff(base, model, "", edits)
    return edits


def apply_edits(model: nn.Module, edits: list[dict]) -> nn.Module:
    """Replay edits on ``model`` in order; returns the (possibly new) root module."""
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise LeanconvError("checkpoint edits must be a list of objects; the file is corrupt")
    for edit in edits:
        path = edit.get("path")
        if not isinstance(path, str) or "module" not in edit:
            raise LeanconvError(f"malformed checkpoint edit {edit!r}; the file is corrupt")
        new = module_from_spec(edit["module"])
        if path == "":
            model = new
            continue
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError as exc:
            raise LeanconvError(f"checkpoint edit names {path!r}, which the base model lacks") from exc
        if name not in parent._modules:
            raise LeanconvError(f"checkpoint edit names {path!r}, which the base model lacks")
        parent._modules[name] = new
    return model


def constructor_name(constructor: Callable[..., nn.Module] | str) -> str:
    """``"package.module:function"`` for a constructor given as a name or as the function itself."""
    if isinstance(constructor, str):
        return constructor
    return f"{constructor.__module__}:{constructor.__qualname__}"


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save(model: nn.Module, path: str | os.PathLike, constructor: Callable[..., nn.Module] | str | None = None,
         extra_tensors: dict[str, torch.Tensor] | None = None,
         constructor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` atomically; returns the header written.

    The file records the model as the unedited model it started from plus edits. That start
    is ``model.leanconv_base`` (set by ``leanconv.models.create`` or ``from_constructor``);
    for any other ``nn.Module`` it is ``constructor(**constructor_kwargs)`` (a function or
    class, or ``"package.module:function"``; default: the model's own class, called without
    arguments). A user model needs ``constructor`` only when it was not built by
    ``from_constructor`` in this process (which remembers the function, not just its name).
    ``extra_tensors`` (e.g. optimiser state) are stored under the ``__extra__.`` prefix and
    ignored by :func:`load`.
    """
    if Path(path).is_dir():
        raise LeanconvError(f"{str(path)!r} is a folder; name the .safetensors file to write")
    base_record = getattr(model, "leanconv_base", None)
    if base_record is None:
        constructor = constructor if constructor is not None else type(model)
        base_record = {"constructor": constructor_name(constructor), "kwargs": dict(constructor_kwargs or {})}
    base = build_base(base_record, constructor or getattr(model, "leanconv_constructor", None))
    header = {
        "format": FORMAT,
        "base": base_record,
        "edits": find_edits(model, base),
        "meta": getattr(model, "leanconv_meta", {}),
    }
    tensors = _state_tensors(model)
    for key, value in (extra_tensors or {}).items():
        tensors[f"__extra__.{key}"] = value.detach().cpu().contiguous().clone()
    try:
        text = json.dumps(header, sort_keys=True)
    except TypeError as exc:
        raise LeanconvError(f"cannot store the model's record as JSON ({exc}); build models with plain "
                            "keyword values (layer types are swapped by edits, not constructor arguments)") from exc
    atomic_write(path, lambda tmp: _write_file(tensors, tmp, text))
    return header


def _write_file(tensors: dict[str, torch.Tensor], path: str, header: str) -> None:
    """safetensors' writer, whose failures (a full disk) are file-system errors: ``OSError``."""
    try:
        save_file(tensors, path, metadata={"leanconv": header})
    except SafetensorError as exc:
        raise os_error(exc, path) from None


def _match_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every floating parameter and buffer the dtype it was saved with (a float64 model
    reloads as float64), before ``load_state_dict`` copies the values in."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        stored = state.get(name)
        if stored is not None and tensor.is_floating_point() and stored.is_floating_point() \
                and stored.dtype != tensor.dtype:
            tensor.data = tensor.data.to(stored.dtype)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON header of a leanconv checkpoint, checked field by field against its schema
    (:mod:`leanconv.checkpoint_header`), without loading weights."""
    path = input_file(path, "checkpoint")
    raw, _ = read_index(path)
    return leanconv_header(raw, path)


# What building a model from hostile (but schema-conforming) numbers may raise besides LeanconvError.
BUILD_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError, RecursionError, MemoryError, AttributeError,
                KeyError, IndexError, ZeroDivisionError, NotImplementedError)


def _not_saved_by(header: dict[str, Any], constructor: Callable[..., nn.Module] | str | None) -> str:
    given = constructor if isinstance(constructor, str) else getattr(constructor, "__qualname__", constructor)
    return (f"the constructor given ({given!r}) does not build the model the file was saved from "
            f"({header['base']['constructor']!r})")


def _mismatch_cause(header: dict[str, Any], constructor: Callable[..., nn.Module] | str | None) -> str:
    """Why a model may not fit its file: with a user constructor, likelier a different constructor."""
    if "constructor" not in header["base"]:
        return "the file is corrupt"
    return f"{_not_saved_by(header, constructor)}; pass that one, unchanged"


def _replay(base: nn.Module, header: dict[str, Any], constructor: Any) -> nn.Module:
    """``apply_edits``; with a user constructor an edit that does not fit names the constructor."""
    try:
        return apply_edits(base, header["edits"])
    except LeanconvError as exc:
        if "constructor" not in header["base"]:
            raise
        raise LeanconvError(f"{_not_saved_by(header, constructor)}: {exc}; pass that one, unchanged") from None


_PASSED: dict[str, None] = {}  # zoo headers (with their tensor index) that passed the dry run in this process
_PASSED_MAX = 256


def _dry_run(header: dict[str, Any], index: dict, path: Path, constructor: Any, cause: str) -> None:
    """Build the model the header describes on the meta device (no memory) and compare it with
    the file's tensors, so that a header can never make leanconv allocate more than its weights
    fill: at most ``MAX_MODEL_ELEMENTS`` or 16 times the file's elements for the base model and
    the layers its edits build (pruning starts from a larger base). A user constructor that
    cannot build on the meta device is built as it is (the user named it).

    The check depends on the header and the index alone for a zoo model, so a header and index
    that passed once in this process pass again without the build (a run loads its checkpoint
    several times; each build took most of a second)."""
    user = "constructor" in header["base"]
    shapes = {k: [d, list(s)] for k, (d, s) in index.items()}
    key = None if user or constructor is not None else json.dumps([header, shapes], sort_keys=True)
    if key in _PASSED:
        return
    _check_build(header, index, path, constructor, cause, user)
    if key is not None:
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.pop(next(iter(_PASSED)))
        _PASSED[key] = None


def _check_build(header: dict[str, Any], index: dict, path: Path, constructor: Any, cause: str, user: bool) -> None:
    stored = sum(math.prod(shape) for _, shape in index.values())
    try:
        model, _ = meta_build(lambda: apply_edits(build_base(header["base"], constructor), header["edits"]),
                              max_elements=max(MAX_MODEL_ELEMENTS, 16 * stored))
    except BuildLimit as exc:
        raise corrupt(path, f"the model its header describes has over {exc}, far more than its "
                      f"{stored:,} stored elements") from None
    except LeanconvError as exc:
        if user:
            return
        raise corrupt(path, str(exc)) from None
    except BUILD_ERRORS as exc:
        if user:
            return
        raise corrupt(path, f"its model cannot be built ({_line(exc)})") from None
    check_fits(model, index, path, cause)
    if not user:
        _check_runs(model, header["meta"], path)


def _check_runs(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Run the meta model of a zoo-based header on one image of its input shape (no memory):
    layers that do not chain (a padding deleted, a stride changed), an output that is not one
    score per recorded class, or a layer output of over ``MAX_ACTIVATION`` values per image
    (a padding of 1024 in every conv) is a corrupt file, refused before anything is allocated."""
    shape = meta.get("input_shape") or getattr(model, "leanconv_meta", {}).get("input_shape")
    if shape is None:
        return
    try:
        out = meta_run(model, shape, max_values=MAX_ACTIVATION)
    except BuildLimit as exc:
        raise corrupt(path, f"the model its header describes outputs over {exc} for one {list(shape)} "
                      "image") from None
    except BUILD_ERRORS as exc:
        raise corrupt(path, f"the model its header describes does not run on its input shape {list(shape)} "
                      f"({_line(exc)})") from None
    classes = meta.get("num_classes")
    if classes is not None and tuple(out.shape) != (1, classes):
        raise corrupt(path, f"the model its header describes outputs {list(out.shape)} for one image, not one "
                      f"score for each of its meta.num_classes ({classes})")


def _line(exc: BaseException) -> str:
    """An exception as one short line (its type, then its text with line breaks folded)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; a name that is not UTF-8 (which safetensors cannot open) is read through Python."""
    try:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            with open(path, "rb") as fh:
                return load_bytes(fh.read())
        return load_file(str(path))
    except (SafetensorError, ValueError) as exc:
        raise LeanconvError(f"{str(path)!r} is truncated or corrupt: {_line(exc)}") from exc


def load(path: str | os.PathLike, constructor: Callable[..., nn.Module] | str | None = None,
         with_extra: bool = False) -> nn.Module | tuple[nn.Module, dict[str, torch.Tensor]]:
    """Rebuild the model stored at ``path``: base + edits + weights (strict). No pickle.

    The header is checked first and the model it describes is built on the meta device and
    compared with the file's tensors (:func:`_dry_run`): a corrupt or hostile header is one
    :class:`LeanconvError` naming the file, before anything is allocated.
    With ``with_extra`` also returns the ``extra_tensors`` given to :func:`save`.
    """
    path = input_file(path, "checkpoint")
    raw, index = read_index(path)
    header = leanconv_header(raw, path)
    cause = _mismatch_cause(header, constructor)
    _dry_run(header, index, path, constructor, cause)
    tensors = _read_tensors(path)
    try:
        base = build_base(header["base"], constructor)
        with torch.random.fork_rng(devices=[]):  # edits build fresh layers too
            model = _replay(base, header, constructor)
    except BUILD_ERRORS as exc:
        raise corrupt(path, f"its model cannot be built ({_line(exc)})") from None
    if hasattr(base, "leanconv_constructor"):
        model.leanconv_constructor = base.leanconv_constructor
    model.leanconv_base = header["base"]
    model.leanconv_meta = header["meta"]
    extra = {k[len("__extra__."):]: v for k, v in tensors.items() if k.startswith("__extra__.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("__extra__.")}
    _match_dtypes(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise LeanconvError(f"checkpoint {str(path)!r} does not fit its own architecture: {cause}") from exc
    if missing or unexpected:
        raise LeanconvError(
            f"checkpoint {str(path)!r} does not fit its own architecture (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}): {cause}"
        )
    model.eval()
    return (model, extra) if with_extra else model


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: safetensors, or a PyTorch file read with
    ``torch.load(weights_only=True)`` (never a full pickle). A dict that holds the state dict
    under ``state_dict`` or ``model`` (common training checkpoints) and a ``module.`` prefix on
    every key (``DataParallel``) are unwrapped."""
    path = input_file(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LeanconvError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):  # torch.save's zip, or a pickle
            raise LeanconvError(f"{str(path)!r} is not a PyTorch weights file (neither torch.save's format nor "
                                "safetensors)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            raise LeanconvError(f"{str(path)!r} holds Python objects besides tensors (a full pickle"
                                f"{', e.g. ' + found.group(1) if found else ''}), which leanconv never loads; save "
                                "model.state_dict() with torch.save or safetensors") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise LeanconvError(f"{str(path)!r} is not a PyTorch weights file: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                           for k, v in state.items()):
        raise LeanconvError(f"{str(path)!r} is not a state dict (names -> tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Copy ``state`` into ``model`` strictly; a missing or unexpected name, or a shape that
    differs, is one line naming them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        if shapes:
            parts.append(f"shape of {shapes[0]}" + (f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""))
        raise LeanconvError(f"the weights in {source} do not fit the model: {'; '.join(parts)}")
    _match_dtypes(model, state)
    model.load_state_dict(state, strict=True)
    return model
