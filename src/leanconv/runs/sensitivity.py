"""HAP's sensitivity analysis, one run: per-channel Hessian traces and sensitivities of a model.

What ``leanconv sensitivity`` (and ``compare``'s per-layer sensitivity) run: ``Tr(H_pp)`` for
every output channel of every conv/linear layer by Hutchinson probes
(:func:`leanconv.importance.hessian.channel_traces`: batched Hessian-vector products averaged
over validation batches, model in eval mode), stopping when the median relative standard
error is at most ``rel_stderr`` or at ``probes``; HAP's sensitivity ``Tr(H_pp) / numel(W_p) *
||W_p||^2`` from the raw traces (which ``prune --method hap`` ranks by) and from the shrunk
ones (``--shrink``), and per-layer sums. Results are cached on disk, keyed by the weights,
the data and the probe settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanconv.errors import LeanconvError
from leanconv.importance.hessian import cached_channel_traces, channel_traces
from leanconv.importance.hessian.hap import probe_settings
from leanconv.runs.config import (RunConfig, batch_size, hessian, probes, reproducing_command, score_images, seed,
                                  setting)
from leanconv.runs.record import Record, Result
from leanconv.runs.source import Source
from leanconv.util import checks
from leanconv.util.progress import Progress

__all__ = ["SensitivityConfig", "run_sensitivity", "sensitivity_details"]


def _groups(value: Any, name: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if text != "layer" and not (isinstance(text, str) and text.isdigit() and int(text) >= 1):
        raise LeanconvError(f"{name} must be a positive whole number or 'layer', got {value!r}")
    return text


@dataclass(frozen=True)
class SensitivityConfig(RunConfig):
    """Settings of one sensitivity analysis (``leanconv sensitivity``)."""

    command = "sensitivity"

    probes: int = probes(64)
    min_probes: int | None = setting(None, "--min-probes", metavar="N",
                                     help="probes always run before the stopping rule may stop (default: 8, or "
                                     "--probes if fewer)")
    rel_stderr: float = setting(0.05, "--rel-stderr", check=lambda v, n: checks.number(v, n, above=0), metavar="R",
                                help="stop when the median relative standard error is below this")
    probe_groups: str = setting("1", "--probe-groups", check=_groups, metavar="G|layer",
                                help="split each probe into G groups of layers (or 'layer': one per layer): G times "
                                "the HVPs per probe, no cross-group noise in the per-channel estimates")
    hessian: str = hessian("hutchinson")
    score_images: int = score_images(aliases=("--images",))
    seed: int = seed()
    batch_size: int = batch_size()

    def check(self) -> None:
        object.__setattr__(self, "probe_groups", _groups(self.probe_groups, "--probe-groups"))  # 2 and "2" alike
        low, high = 2, self.probes
        if self.min_probes is not None and not (isinstance(self.min_probes, int) and low <= self.min_probes <= high):
            raise LeanconvError(f"--min-probes must lie between 2 and --probes ({self.probes}), got {self.min_probes}")

    def trace_settings(self) -> dict[str, Any]:
        """The settings of :func:`~leanconv.importance.hessian.channel_traces`."""
        groups = self.probe_groups if self.probe_groups == "layer" else int(self.probe_groups)
        return {**probe_settings(self.probes, self.seed, self.min_probes), "rel_stderr": self.rel_stderr,
                "probe_groups": groups, "estimator": self.hessian}

    def run(self, source: Source, **kwargs: Any) -> Result:
        return run_sensitivity(self, source, **kwargs)


def sensitivity_details(model, result) -> dict:
    """Per-channel traces, standard errors and HAP sensitivities (from the raw traces and from
    the shrunk ones), and per-layer sums, of a :class:`~leanconv.importance.hessian.TraceResult`."""
    sens = result.hap_sensitivity(model)
    shrunk, shrunk_sens = result.shrunk_traces(), result.hap_sensitivity(model, shrink=True)
    layers = {n: {"trace": float(result.traces[n].sum()), "trace_stderr": float(result.stderr[n].pow(2).sum().sqrt()),
                  "sensitivity": float(sens[n].sum()), "channels": int(result.traces[n].numel())} for n in sens}
    return {"probes": result.probes, "converged": result.converged, "method": result.method,
            "achieved_rel_stderr": result.achieved_rel_stderr, "layers": layers,
            "channels": {n: {"trace": result.traces[n].tolist(), "stderr": result.stderr[n].tolist(),
                             "sensitivity": sens[n].tolist(), "trace_shrunk": shrunk[n].tolist(),
                             "sensitivity_shrunk": shrunk_sens[n].tolist()} for n in sens}}


def run_sensitivity(config: SensitivityConfig, source: Source, *, out: str | Path | None = None,
                    cache_dir: str | Path | None = None, progress: Progress | None = None, **_: Any) -> Result:
    """Hessian traces and HAP sensitivities of ``source``'s model (module docstring), cached in
    ``cache_dir`` (default ``out/cache``; no cache without either). The result has no model."""
    model = source.fresh()
    batches = source.data.scoring_batches(config.score_images, config.batch_size, source.resolution)
    cache = cache_dir if cache_dir is not None else (Path(out) / "cache" if out is not None else None)
    settings = {**config.trace_settings(), "progress": progress}
    if cache is not None:
        result = cached_channel_traces(model, batches, Path(cache), **settings)
    else:
        result = channel_traces(model, batches, **settings)
    details = {"images": sum(len(y) for _, y in batches), **sensitivity_details(model, result)}
    command = reproducing_command(config, source, out)
    record = Record("sensitivity", config.to_dict(), command, source.describe(), list(source.shape), None, None,
                    result.seconds, details)
    return Result(None, record)
