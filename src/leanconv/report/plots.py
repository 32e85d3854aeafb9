"""Plots written as PNG files (matplotlib, Agg backend: no display needed).

Every function takes plain numbers (what a JSON record holds) and a path, writes the figure
atomically and returns the path, so a report can be rebuilt from its record alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leanconv.util.files import atomic_write  # noqa: E402

__all__ = ["channels_chart", "sensitivity_chart", "tradeoff_chart", "save_figure"]


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (atomically, fixed metadata so reruns are identical)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight",
                                               metadata={"Software": None}))
    plt.close(fig)
    return path


def _short(names: Sequence[str]) -> list[str]:
    return [n.replace(".weight", "").replace("layer", "L") for n in names]


def channels_chart(layers: Mapping[str, Sequence[int]], path: str | Path, title: str = "") -> Path:
    """Bar chart of output channels per layer, before and after: ``layers[name] = (before, after)``."""
    names = list(layers)
    before = [layers[n][0] for n in names]
    after = [layers[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar(xs, before, color="#c8d3e0", label="before")
    ax.bar(xs, after, color="#2f6db5", width=0.55, label="after")
    ax.set_xticks(list(xs), _short(names), rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title or "channels per layer")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def sensitivity_chart(per_layer: Mapping[str, float], path: str | Path, *, stderr: Mapping[str, float] | None = None,
                      ylabel: str = "sum of channel sensitivity", title: str = "") -> Path:
    """Per-layer bar chart (log scale when values span decades), optional error bars."""
    names = list(per_layer)
    values = [per_layer[n] for n in names]
    errs = [stderr[n] for n in names] if stderr else None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), values, yerr=errs, color="#b5552f", capsize=2)
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), _short(names), rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Hessian sensitivity per layer")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def tradeoff_chart(points: Sequence[Mapping], path: str | Path, *, x: str, y: str = "accuracy",
                   xlabel: str = "", ylabel: str = "test accuracy (%)", title: str = "",
                   baseline: float | None = None, pareto: bool = True) -> Path:
    """Scatter of ``points`` (dicts with ``label``, ``x`` and ``y`` keys), one colour and marker
    pair per label (unique for up to 50 labels), with the Pareto front (lower x, higher y)
    drawn as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = sorted({p["label"] for p in points})
    cmap = plt.get_cmap("tab10")
    markers = "osD^v"
    for i, label in enumerate(labels):
        mine = [p for p in points if p["label"] == label]
        ax.scatter([p[x] for p in mine], [p[y] for p in mine], label=label, color=cmap(i % 10),
                   marker=markers[(i // 10) % len(markers)], s=36, zorder=3)
    if pareto and points:
        front, best = [], float("-inf")
        for p in sorted(points, key=lambda p: (p[x], -p[y])):
            if p[y] > best:
                front.append(p)
                best = p[y]
        ax.plot([p[x] for p in front], [p[y] for p in front], color="#555", lw=1, ls="--", zorder=2, label="Pareto front")
    if baseline is not None:
        ax.axhline(baseline, color="#999", lw=1, ls=":", label="unpruned")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path)
