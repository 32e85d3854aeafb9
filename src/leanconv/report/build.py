"""``build_report(DIR)``: report.md, report.html and their figures from ``DIR/results.jsonl`` alone.

Nothing is measured or loaded here: every number comes from the record (schema in
:mod:`leanconv.runs.results`), so a report can be rebuilt anywhere, at any time, and two
builds of the same record are byte-for-byte identical apart from the single line that
starts with ``Built:`` (rows keep the record's order, numbers have fixed formats, and the
PNGs carry no timestamp metadata).

Written into ``DIR``: ``report.md``, ``report.html`` (self-contained: figures embedded) and
``figures/*.png`` (linked from report.md). Figures that no longer apply (e.g. the sensitivity
chart after the sensitivity record was removed) are deleted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from leanconv import __version__
from leanconv.report import plots
from leanconv.report.document import (STAMP_PREFIX, Banner, Block, Code, Document, Figure, Heading, Paragraph,
                                      Stamp, TableBlock)
from leanconv.report.html import write_html
from leanconv.report.markdown import write_markdown
from leanconv.runs.results import RESULTS_FILE, read_results
from leanconv.report.tables import (best_pruned, budget_tables, channel_pairs, channel_table, comparison_table,
                                    fmt_macs)
from leanconv.util.fileset import write_together

__all__ = ["build_report", "build_document", "QUICK_BANNER", "FIGURE_DIR"]

QUICK_BANNER = "QUICK RUN: tiny budgets, figures not representative"
FIGURE_DIR = "figures"
_FIGURES = ("accuracy_vs_macs", "accuracy_vs_latency", "channels", "sensitivity")


def _tradeoff_points(results: Mapping[str, Any], value) -> list[dict]:
    base = results["baseline"]
    records = [base, *results["entries"]]
    return [{"label": r["label"], "x": value(r), "y": r["accuracy"]} for r in records]


def _latency_axis(base: Mapping[str, Any]) -> tuple[str, str, str]:
    """(latency_ms key, batch key, words) of the comparison's runtime and batch; records from
    before runtimes were chosen: eager PyTorch at batch 64."""
    timing = base.get("timing")
    if timing and timing.get("runtime_key") in base["latency_ms"] and base["latency_ms"][timing["runtime_key"]]:
        batch = f"batch{timing['batch']}"
        if batch in base["latency_ms"][timing["runtime_key"]]:
            return timing["runtime_key"], batch, f"{timing['runtime']}, batch {timing['batch']}"
    return "torch", "batch64", "PyTorch, batch 64"


def _make_figures(results: Mapping[str, Any], fig_dir: Path) -> dict[str, Figure]:
    """Draw every figure that applies; returns name -> Figure (href relative to the report)."""
    base, made = results["baseline"], {}

    def figure(name: str, alt: str, caption: str) -> Figure:
        return Figure(fig_dir / f"{name}.png", f"{FIGURE_DIR}/{name}.png", alt, caption)

    made["accuracy_vs_macs"] = figure(
        "accuracy_vs_macs", "test accuracy against MACs per image",
        "Test accuracy against MACs per image (millions); dashed line: Pareto front; dotted: unpruned accuracy.")
    plots.tradeoff_chart(_tradeoff_points(results, lambda r: r["macs"] / 1e6), made["accuracy_vs_macs"].path,
                         x="x", y="y", xlabel="MACs per image (M)", title="Accuracy vs MACs",
                         baseline=base["accuracy"])
    key, batch, where = _latency_axis(base)
    made["accuracy_vs_latency"] = figure(
        "accuracy_vs_latency", f"test accuracy against measured latency on {where}",
        f"Test accuracy against measured latency on {where} (ms per batch; each model timed side by side with "
        "the baseline); dashed line: Pareto front. The x axis is what a deployment pays; MACs are in the tables.")
    plots.tradeoff_chart(_tradeoff_points(results, lambda r: r["latency_ms"][key][batch]),
                         made["accuracy_vs_latency"].path, x="x", y="y", xlabel=f"latency, {where} (ms)",
                         title="Accuracy vs measured latency", baseline=base["accuracy"])
    best = best_pruned(results["entries"])
    if best is not None:
        made["channels"] = figure("channels", f"channels per layer before and after {best['key']}",
                                  f"Output channels per layer: baseline (light) and {best['label']} "
                                  f"[{best['key']}] (dark).")
        plots.channels_chart(channel_pairs(base["channels"], best["channels"]), made["channels"].path,
                             title=f"channels per layer: {best['label']} [{best['key']}]")
    sens = results["sensitivity"]
    if sens is not None and sens["layers"]:
        made["sensitivity"] = figure("sensitivity", "Hessian sensitivity per layer",
                                     "Sum of per-channel Hessian sensitivity per layer (Hutchinson estimate).")
        plots.sensitivity_chart(sens["layers"], made["sensitivity"].path)
    for name in _FIGURES:
        if name not in made:
            (fig_dir / f"{name}.png").unlink(missing_ok=True)
    return made


def _summary(results: Mapping[str, Any]) -> list[Block]:
    base, n = results["baseline"], len(results["entries"])
    onnx = "and ONNX Runtime " if base["latency_ms"].get("onnx") is not None else ""
    timing = base.get("timing")
    where = []
    if timing:
        versions = ", ".join(f"{k} {v}" for k, v in timing.get("versions", {}).items())
        budget = (f"latency measured on {timing['runtime']} at batch {timing['batch']}"
                  if timing["budget"] == "latency" else "MACs")
        where = [Paragraph(f"Timing: {timing['method']}, {timing['threads']} thread(s), on {timing['cpu']} "
                           f"({versions}). Budgets: {budget}.")]
    return [
        Paragraph(f"Baseline: test accuracy {base['accuracy']:.2f}%, {base['params']:,} parameters, "
                  f"{fmt_macs(base['macs'])} M MACs per image (FLOPs = 2 x MACs). {n} compressed "
                  f"model{'s' if n != 1 else ''} compared."),
        *where,
        Paragraph(f"Latency: median milliseconds per forward pass of a whole batch on CPU, {base['threads']} "
                  f"thread{'s' if base['threads'] != 1 else ''}, eager PyTorch {onnx}(n/a: not measured). "
                  "Δ acc: test accuracy minus the baseline's, in percentage points. Speedup at batch 64: the "
                  "model timed side by side with the baseline, median over interleaved rounds (lowest-highest "
                  "round in brackets; * marks an older record's ratio of two medians). MAC ratio: baseline MACs / "
                  "model MACs, the speedup that counting alone would promise."),
    ]


def _result_tables(results: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Results", "results")]
    tables = budget_tables(results)
    if not tables:
        blocks.append(Paragraph("No compressed models in the record yet: only the baseline."))
        blocks.append(TableBlock(comparison_table(results["baseline"], [])))
    for anchor, title, table in tables:
        blocks += [Heading(3, title, anchor), TableBlock(table)]
    return blocks


def _figure_sections(results: Mapping[str, Any], figures: Mapping[str, Figure]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Trade-offs", "trade-offs"), figures["accuracy_vs_macs"],
                           figures["accuracy_vs_latency"]]
    best = best_pruned(results["entries"])
    if best is not None:
        pairs = channel_pairs(results["baseline"]["channels"], best["channels"])
        blocks += [Heading(2, "Channels of the best pruned model", "channels"),
                   Paragraph(f"{best['label']} [{best['key']}]: the most accurate width or 3-D model "
                             f"({best['accuracy']:.2f}% test accuracy)."),
                   figures["channels"], TableBlock(channel_table(pairs), "channels")]
    if "sensitivity" in figures:
        sens = results["sensitivity"]
        blocks += [Heading(2, "Hessian sensitivity per layer", "sensitivity"),
                   Paragraph(f"Estimated with {sens['probes']} Hutchinson probes on {sens['images']} images."),
                   figures["sensitivity"]]
    return blocks


def _entry_note(e: Mapping[str, Any]) -> str:
    epochs = e["finetune_epochs"]
    parts = [f"{e['key']} ({e['label']}, family {e['family']}", f"fine-tuned {epochs} epoch{'s' if epochs != 1 else ''}",
             f"{e['seconds']:.0f} s", f"checkpoint {e['checkpoint']})"]
    note = ", ".join(parts)
    return f"{note}: {e['notes']}" if e["notes"] else note


def _reproduce(results: Mapping[str, Any]) -> list[Block]:
    base = results["baseline"]
    blocks: list[Block] = [Heading(2, "Reproduce", "reproduce"),
                           Paragraph("The exact command behind each row, in the order of results.jsonl."),
                           Code(f"baseline (checkpoint {base['checkpoint']})", base["command"])]
    blocks += [Code(_entry_note(e), e["command"]) for e in results["entries"]]
    return blocks


def build_document(results: Mapping[str, Any], figures: Mapping[str, Figure], built: str) -> Document:
    """Lay the report out as format-neutral blocks (see :mod:`leanconv.report.document`)."""
    base = results["baseline"]
    shape = "x".join(str(s) for s in base["input_shape"])
    title = f"leanconv report: {base['model']} on {base['dataset']} (input {shape})"
    blocks: list[Block] = []
    if base["quick"]:
        blocks.append(Banner(QUICK_BANNER))
    blocks.append(Stamp(f"{STAMP_PREFIX} {built} by leanconv {__version__} from {RESULTS_FILE} "
                        "(the only line that changes when the report is rebuilt)"))
    blocks += _summary(results) + _result_tables(results) + _figure_sections(results, figures)
    blocks += _reproduce(results)
    return Document(title, tuple(blocks))


def build_report(out_dir: str | Path, *, now: datetime | None = None) -> dict[str, Path]:
    """Read ``out_dir/results.jsonl`` and write ``figures/*.png`` (each file whole), then
    ``report.md`` and ``report.html`` there as one file set
    (:func:`~leanconv.util.fileset.write_together`). ``now`` (default: the current UTC time) fills the ``Built:``
    line. Returns ``{"html": path, "markdown": path, <figure name>: path, ...}``. Raises
    :class:`~leanconv.errors.LeanconvError` when the record is missing or invalid."""
    out = Path(out_dir)
    results = read_results(out / RESULTS_FILE)
    figures = _make_figures(results, out / FIGURE_DIR)
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    doc = build_document(results, figures, stamp)
    write_together(out, {"report.html": lambda p: write_html(doc, p), "report.md": lambda p: write_markdown(doc, p)})
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    paths.update({name: fig.path for name, fig in figures.items()})
    return paths
