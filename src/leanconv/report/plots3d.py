"""Plots of three-dimensional pruning (Wang et al., ICML 2021), rebuilt from ``record.json``.

* :func:`surface_chart`: the fitted accuracy predictor ``F(d, w, r)`` as filled contours over
  ``(w, r)``, one panel per depth ``d``, with the samples of that depth overlaid.
* :func:`budget_chart`: the predicted accuracy along the budget boundary (for each ``d``
  and ``w``, the largest allowed ``r`` within the MACs budget) with the chosen point, and
  the samples' validation accuracy against their counted MACs with the budget marked.
* :func:`prune3d_plots`: both, from a ``leanconv prune3d`` record, into a folder
  (:func:`prune3d_plot_writers`: as writers for the run's file set).

Inputs are plain numbers as the record holds them (MACs: multiply-accumulates, one image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leanconv.report.plots import save_figure  # noqa: E402
from leanconv.prune3d.predictor import predictor_from_dict  # noqa: E402

__all__ = ["surface_chart", "budget_chart", "prune3d_plot_writers", "prune3d_plots"]

_KIND_MARKERS = {"base": "*", "depth": "s", "width": "^", "resolution": "v", "mixed": "o"}


def _panel_depths(domain: Sequence[Sequence[float]], d_values: Sequence[float] | None) -> list[float]:
    if d_values:
        return sorted({round(float(d), 6) for d in d_values})
    lo, hi = domain[0]
    return sorted({round(v, 6) for v in (lo, 0.5 * (lo + hi), hi)})


def surface_chart(predictor: Mapping, samples: Sequence[Mapping], path: str | Path, *,
                  d_values: Sequence[float] | None = None, chosen: Mapping | None = None,
                  points: int = 41, title: str = "") -> Path:
    """Filled contours of ``F`` over ``(w, r)`` (the predictor's sample box) at each depth
    of ``d_values`` (default: the box's ends and middle); samples are drawn on the panel of
    the nearest depth, coloured by their validation accuracy on the same scale as ``F``."""
    model = predictor_from_dict(dict(predictor))
    domain = predictor["domain"]
    depths = _panel_depths(domain, d_values)
    ws, rs = np.linspace(*domain[1], points), np.linspace(*domain[2], points)
    W, R = np.meshgrid(ws, rs, indexing="xy")
    surfaces = [model.predict(np.stack([np.full(W.size, d), W.ravel(), R.ravel()], 1)).reshape(W.shape) for d in depths]
    accs = [float(s["accuracy"]) for s in samples]
    lo = min([float(np.min(f)) for f in surfaces] + accs)
    hi = max([float(np.max(f)) for f in surfaces] + accs)
    levels = np.linspace(lo, hi if hi > lo else lo + 1e-6, 15)
    fig, axes = plt.subplots(1, len(depths), figsize=(4.0 * len(depths) + 1.0, 3.8), squeeze=False, sharey=True)
    for ax, d, f in zip(axes[0], depths, surfaces):
        filled = ax.contourf(W, R, f, levels=levels, cmap="viridis")
        nearest = [s for s in samples if min(depths, key=lambda x: abs(x - s["d"])) == d]
        for kind, marker in _KIND_MARKERS.items():
            mine = [s for s in nearest if s.get("kind") == kind]
            if mine:
                ax.scatter([s["w"] for s in mine], [s["r"] for s in mine], c=[s["accuracy"] for s in mine],
                           cmap="viridis", vmin=levels[0], vmax=levels[-1], marker=marker, s=46,
                           edgecolors="white", linewidths=0.8, label=kind, zorder=3)
        if chosen is not None and abs(chosen["d"] - d) < 1e-6:
            ax.scatter([chosen["w"]], [chosen["r"]], marker="X", s=110, color="#d62728", edgecolors="white",
                       zorder=4, label="chosen")
        for lim, (a, b) in ((ax.set_xlim, domain[1]), (ax.set_ylim, domain[2])):
            pad = 0.04 * (b - a) if b > a else 0.02
            lim(a - pad, b + pad)
        ax.set_title(f"d = {d:.3g}")
        ax.set_xlabel("width w")
        ax.legend(fontsize=6, frameon=False, loc="lower right")
    axes[0][0].set_ylabel("resolution r")
    fig.colorbar(filled, ax=list(axes[0]), label="validation accuracy (%)")
    fig.suptitle(title or f"fitted accuracy F(d, w, r) ({predictor.get('kind', '')})")
    return save_figure(fig, path)


def _boundary_panel(ax, curve: Sequence[Mapping], chosen: Mapping | None) -> None:
    depths = sorted({row["d"] for row in curve})
    cmap = plt.get_cmap("plasma")
    for i, d in enumerate(depths):
        rows = sorted((row for row in curve if row["d"] == d), key=lambda row: row["w"])
        ax.plot([row["w"] for row in rows], [row["predicted_accuracy"] for row in rows],
                color=cmap(i / max(1, len(depths) - 1) * 0.85), lw=1.3, label=f"d={d:.3g}")
    if chosen is not None:
        ax.scatter([chosen["w"]], [chosen["predicted_accuracy"]], marker="*", s=180, color="#d62728", zorder=4,
                   label=f"chosen d={chosen['d']:.3g} w={chosen['w']:.3g} r={chosen['r']:.3g}")
    ax.set_xlabel("width w (r: the largest allowed within budget)")
    ax.set_ylabel("predicted validation accuracy (%)")
    ax.set_title("along the budget boundary")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, frameon=False)


def _samples_panel(ax, samples: Sequence[Mapping], macs0: float, budget_macs: float,
                   measured: Mapping | None, cost: str = "macs") -> None:
    for kind, marker in _KIND_MARKERS.items():
        mine = [s for s in samples if s.get("kind") == kind]
        if mine:
            ax.scatter([s[cost] / macs0 for s in mine], [s["accuracy"] for s in mine], marker=marker, s=36,
                       label=kind, zorder=3)
    ax.axvline(budget_macs / macs0, color="#d62728", ls="--", lw=1, label="budget")
    if measured is not None:
        ax.scatter([measured["macs_ratio"]], [measured["predicted"]], marker="*", s=160, color="#d62728",
                   zorder=4, label="chosen (predicted)")
        ax.scatter([measured["macs_ratio"]], [measured["measured"]], marker="P", s=90, color="#2ca02c",
                   zorder=4, label="chosen (measured, same fine-tuning)")
    timed = any("latency_table" in s for s in samples)  # a timed sample keeps the table's figure beside its own
    ax.set_xlabel("counted MACs / unpruned MACs" if cost == "macs" else
                  f"latency / unpruned latency (samples: {'timed' if timed else 'predicted'}; chosen: measured)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, frameon=False)


def budget_chart(curve: Sequence[Mapping], path: str | Path, *, chosen: Mapping | None = None,
                 samples: Sequence[Mapping] = (), macs0: float | None = None, budget_macs: float | None = None,
                 measured: Mapping | None = None, title: str = "", cost: str = "macs") -> Path:
    """Left: predicted accuracy along the budget boundary per depth (rows of ``curve`` with
    ``d, w, r, predicted_accuracy``), the chosen point starred. Right (with ``samples``,
    ``macs0`` and ``budget_macs``): samples' accuracy against their MACs ratio; ``measured``
    (``macs_ratio``, ``predicted``, ``measured``) marks the chosen model. ``cost="latency"``:
    the samples' ``latency`` ratios instead (``macs0`` 1, ``budget_macs`` the target)."""
    right = bool(samples) and macs0 is not None and budget_macs is not None
    fig, axes = plt.subplots(1, 2 if right else 1, figsize=(11.0 if right else 6.0, 4.0), squeeze=False)
    _boundary_panel(axes[0][0], curve, chosen)
    if right:
        _samples_panel(axes[0][1], samples, float(macs0), float(budget_macs), measured, cost)
    fig.suptitle(title or "three-dimensional pruning: accuracy under the MACs budget")
    return save_figure(fig, path)


def prune3d_plot_writers(record: Mapping) -> dict[str, Callable[[Path], Path]]:
    """Writers (name -> ``write(path)``) of ``surface.png`` and ``budget.png`` from a
    ``leanconv prune3d`` record, to be written with the run's other files as one set."""
    choice, samples, budget = record["choice"], record["samples"], record["budget"]
    box_d = record["predictor"]["model"]["domain"][0]
    depths = sorted({box_d[0], choice["d"], box_d[1]})
    latency = budget.get("kind") == "latency"
    measured = {"macs_ratio": record["latency_budget"]["attempts"][-1]["measured"]["median"] if latency
                else choice["counted_macs"] / budget["macs0"],
                "predicted": record["accuracy"]["predicted_val"],
                "measured": record["accuracy"]["measured_val_protocol"]}
    scale = {"macs0": 1.0, "budget_macs": budget["target"], "cost": "latency"} if latency else \
        {"macs0": budget["macs0"], "budget_macs": budget["budget_macs"]}
    what = "measured latency" if latency else "MACs"
    return {
        "surface.png": lambda path: surface_chart(record["predictor"]["model"], samples, path, d_values=depths,
                                                  chosen=choice),
        "budget.png": lambda path: budget_chart(record["budget_curve"], path, chosen=choice, samples=samples,
                                                measured=measured, title=f"target {budget['target']:g} of the {what}",
                                                **scale),
    }


def prune3d_plots(record: Mapping, out_dir: str | Path) -> list[Path]:
    """``surface.png`` and ``budget.png`` in ``out_dir`` from a ``leanconv prune3d`` record."""
    return [write(Path(out_dir) / name) for name, write in prune3d_plot_writers(record).items()]
