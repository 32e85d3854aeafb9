"""leanconv: make convolutional networks physically smaller and measurably faster.

The public API (names load on first use, so ``import leanconv`` stays light)::

    import leanconv

    model = leanconv.create_model("resnet20", in_channels=1, input_size=28)   # or your own nn.Module
    source = leanconv.Source.from_checkpoint("runs/r20/model.safetensors")    # a trained model + its data
    config = leanconv.PruneConfig(method="hap", target=0.5, finetune_epochs=1)
    result = leanconv.run_prune(config, source, out="runs/r20_hap")          # or config.run(source, ...)
    result.save("runs/r20_hap")           # model.safetensors + record.json (with the command that reproduces it)
    print(result.record.to_dict()["after"]["test_accuracy"])

Every run (``run_prune``, ``run_prune3d``, ``run_convert``, ``run_sensitivity``, ``run_compare``)
has the same shape: a frozen config, a :class:`Source`, a :class:`Result` (docs/design.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from leanconv.errors import LeanconvError

__version__ = "0.1.0"

# public name -> (module, attribute), grouped by concept
_API = {
    # models
    "create_model": ("leanconv.models", "create"),
    "list_models": ("leanconv.models", "names"),
    "from_constructor": ("leanconv.models", "from_constructor"),
    # importance criteria
    "list_criteria": ("leanconv.importance", "criterion_names"),
    "create_criterion": ("leanconv.importance", "create_criterion"),
    "register_criterion": ("leanconv.importance", "register_criterion"),
    # checkpoints (safetensors, no pickle)
    "save": ("leanconv.checkpoint", "save"),
    "load": ("leanconv.checkpoint", "load"),
    # data
    "load_dataset": ("leanconv.data", "load_dataset"),
    # one call each, on a plain nn.Module and your own batches
    "prune": ("leanconv.runs.calls", "prune"),
    "convert": ("leanconv.runs.calls", "convert"),
    "finetune": ("leanconv.runs.calls", "finetune"),
    "profile": ("leanconv.runs.calls", "profile"),
    "count": ("leanconv.cost", "count"),
    # runs: config -> run -> record
    "Source": ("leanconv.runs", "Source"),
    "Result": ("leanconv.runs", "Result"),
    "PruneConfig": ("leanconv.runs", "PruneConfig"),
    "run_prune": ("leanconv.runs", "run_prune"),
    "Prune3dConfig": ("leanconv.runs", "Prune3dConfig"),
    "run_prune3d": ("leanconv.runs", "run_prune3d"),
    "ConvertConfig": ("leanconv.runs", "ConvertConfig"),
    "run_convert": ("leanconv.runs", "run_convert"),
    "SensitivityConfig": ("leanconv.runs", "SensitivityConfig"),
    "run_sensitivity": ("leanconv.runs", "run_sensitivity"),
    "CompareConfig": ("leanconv.runs", "CompareConfig"),
    "run_compare": ("leanconv.runs", "run_compare"),
}

__all__ = ["LeanconvError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'leanconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
