"""Compression runs: one config -> one run function -> one record, for every method.

Each run has a frozen config (:mod:`.config`: fields that know their command-line option and
check themselves once), starts from a :class:`~.source.Source` (a trained model and its data),
and returns a :class:`~.record.Result`: the model it made and one :class:`~.record.Record`
(``record.json``), whose ``command`` reproduces it. ``config.run(source, out=...)`` runs any
of them:

* :mod:`.prune`: width pruning (``PruneConfig``, ``run_prune``; HAP and every criterion);
* :mod:`.prune3d`: depth x width x resolution (``Prune3dConfig``, ``run_prune3d``);
* :mod:`.convert`: layer conversion to SCC or pSConv (``ConvertConfig``, ``run_convert``);
* :mod:`.sensitivity`: HAP's per-channel Hessian sensitivities (``SensitivityConfig``);
* :mod:`.compare`: every method on one checkpoint, each entry one of the runs above
  (``CompareConfig``, ``run_compare``), into the record store of :mod:`.results`.
"""

from leanconv.runs.compare import CompareConfig, run_compare
from leanconv.runs.config import RunConfig, command_line
from leanconv.runs.convert import ConvertConfig, run_convert
from leanconv.runs.prune import PruneConfig, run_prune
from leanconv.runs.prune3d import Prune3dConfig, run_prune3d
from leanconv.runs.record import Record, Result, measure
from leanconv.runs.sensitivity import SensitivityConfig, run_sensitivity
from leanconv.runs.source import Source

__all__ = [
    "RunConfig", "Source", "Record", "Result", "measure", "command_line",
    "PruneConfig", "run_prune",
    "Prune3dConfig", "run_prune3d",
    "ConvertConfig", "run_convert",
    "SensitivityConfig", "run_sensitivity",
    "CompareConfig", "run_compare",
]
