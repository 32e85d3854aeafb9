"""Comparison tables built from a results record, rendered as Markdown or HTML.

A :class:`Table` is plain strings: every number is formatted here, once, with fixed precision,
so the Markdown and HTML reports show identical figures and rebuild byte for byte.

Columns of a comparison table (units in the header): test accuracy (%), its difference to
the baseline in percentage points, parameters, MACs for one image in millions, median
latency per batch of 1 and 64 images in eager PyTorch and ONNX Runtime (ms), the measured
speedup at batch 64 for both backends, and the MAC ratio (baseline MACs / model MACs): the
speedup that counting alone would promise. A speedup is the model timed side by side with the
baseline in interleaved rounds (the record's ``speedup``: median over rounds, with the lowest
and highest round in brackets); records made before leanconv timed side by side give the ratio
of the two medians, marked ``*``.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, NamedTuple, Sequence

__all__ = ["Table", "COLUMNS", "budget_tables", "comparison_table", "channel_table", "channel_pairs",
           "best_pruned", "to_markdown", "to_html", "fmt_ms", "fmt_macs"]


class Table(NamedTuple):
    """Header, rows (strings only) and per-column alignment (``"l"`` or ``"r"``); ``keys``
    names the record behind each row (``"baseline"`` for the baseline)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: tuple[str, ...]
    keys: tuple[str, ...] = ()


COLUMNS = ("method", "test acc (%)", "Δ acc (pts)", "params", "MACs (M)", "torch b1 (ms)", "torch b64 (ms)",
           "ORT b1 (ms)", "ORT b64 (ms)", "speedup torch b64", "speedup ORT b64", "MAC ratio")


def fmt_ms(value: float | None) -> str:
    """Milliseconds: three decimals below 100 ms, one below 10 s, none above."""
    if value is None:
        return "n/a"
    if value < 100:
        return f"{value:.3f}"
    return f"{value:.1f}" if value < 10_000 else f"{value:.0f}"


def fmt_macs(macs: int) -> str:
    """MACs in millions: two decimals, four below 0.1 M."""
    millions = macs / 1e6
    return f"{millions:.2f}" if millions >= 0.1 else f"{millions:.4f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "n/a"
    return f"{num / den:.2f}x"


def _latency(record: Mapping[str, Any], backend: str, batch: str) -> float | None:
    pair = record["latency_ms"].get(backend)
    return None if pair is None else float(pair[batch])


def _speedup(record: Mapping[str, Any], baseline: Mapping[str, Any], backend: str, batch: str) -> str:
    """The side-by-side speedup with its spread, or (an older record) the ratio of medians, marked."""
    if record is baseline:
        return "1.00x"
    measured = (record.get("speedup") or {}).get(backend) or {}
    if batch in measured:
        s = measured[batch]
        return f"{s['median']:.2f}x ({s['low']:.2f}-{s['high']:.2f})"
    ratio = _ratio(_latency(baseline, backend, batch), _latency(record, backend, batch))
    return ratio if ratio == "n/a" else ratio + "*"


def _row(record: Mapping[str, Any], baseline: Mapping[str, Any], method: str) -> tuple[str, ...]:
    is_base = record is baseline
    delta = "—" if is_base else f"{record['accuracy'] - baseline['accuracy']:+.2f}"
    lat = {(b, n): _latency(record, b, n) for b in ("torch", "onnx") for n in ("batch1", "batch64")}
    return (
        method,
        f"{record['accuracy']:.2f}",
        delta,
        f"{record['params']:,}",
        fmt_macs(record["macs"]),
        fmt_ms(lat["torch", "batch1"]),
        fmt_ms(lat["torch", "batch64"]),
        fmt_ms(lat["onnx", "batch1"]),
        fmt_ms(lat["onnx", "batch64"]),
        _speedup(record, baseline, "torch", "batch64"),
        _speedup(record, baseline, "onnx", "batch64"),
        _ratio(baseline["macs"], record["macs"]),
    )


def comparison_table(baseline: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> Table:
    """Baseline first, then ``entries`` in the given order. A label that occurs twice in the
    table is told apart by its key."""
    labels = [e["label"] for e in entries]
    rows = [_row(baseline, baseline, baseline["label"])]
    for entry in entries:
        method = entry["label"] if labels.count(entry["label"]) == 1 else f"{entry['label']} [{entry['key']}]"
        rows.append(_row(entry, baseline, method))
    align = ("l",) + ("r",) * (len(COLUMNS) - 1)
    return Table(COLUMNS, tuple(rows), align, ("baseline", *(e["key"] for e in entries)))


def _budget_title(target: float, timing: Mapping[str, Any] | None, entries: Sequence[Mapping[str, Any]]) -> str:
    if timing and timing.get("budget") == "latency":
        # a 3-D entry aims at MACs where the latency came from another device's table (its notes say why)
        on_macs = any(e["family"] == "3d" and e.get("budget") == "macs" for e in entries)
        return (f"Latency budget {100 * target:.4g}% of the baseline on {timing['runtime']}, batch {timing['batch']} "
                f"(target {target:g}{f'; 3-D pruning: MACs {target:g}' if on_macs else ''})")
    return f"MACs budget {100 * target:.4g}% of the baseline (target {target:g})"


def budget_tables(results: Mapping[str, Any]) -> list[tuple[str, str, Table]]:
    """``(anchor, title, table)`` per budget (MACs or latency), largest budget first, width and 3-D entries
    in file order; then one table of the layer variants (family ``layer``) if there are any."""
    baseline, entries = results["baseline"], results["entries"]
    pruned = [e for e in entries if e["family"] != "layer"]
    out = []
    for target in sorted({float(e["target"]) for e in pruned}, reverse=True):
        mine = [e for e in pruned if float(e["target"]) == target]
        anchor = "budget-" + f"{target:g}".replace(".", "_")
        out.append((anchor, _budget_title(target, baseline.get("timing"), mine), comparison_table(baseline, mine)))
    layers = [e for e in entries if e["family"] == "layer"]
    if layers:
        out.append(("layer-variants", "Layer variants (new convolution types)", comparison_table(baseline, layers)))
    return out


def best_pruned(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The width or 3-D entry with channel counts and the highest accuracy (first in file
    order on a tie), or None."""
    best = None
    for entry in entries:
        if entry["family"] in ("width", "3d") and entry.get("channels") is not None:
            if best is None or entry["accuracy"] > best["accuracy"]:
                best = entry
    return best


def channel_pairs(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``layer -> (before, after)`` in the baseline's layer order; a layer the pruned model
    lacks (a bypassed block) has 0 after, a layer only it has (an implant) 0 before."""
    pairs = {name: (int(n), int(after.get(name, 0))) for name, n in before.items()}
    for name, n in after.items():
        if name not in pairs:
            pairs[name] = (0, int(n))
    return pairs


def channel_table(pairs: Mapping[str, tuple[int, int]]) -> Table:
    """Per-layer output channels before and after pruning, with the share kept."""
    rows = []
    for name, (before, after) in pairs.items():
        kept = f"{100 * after / before:.1f}" if before else "new"
        rows.append((name, str(before), str(after), kept))
    return Table(("layer", "channels before", "channels after", "kept (%)"), tuple(rows), ("l", "r", "r", "r"),
                 tuple(pairs))


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in table.align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def to_html(table: Table, css_class: str = "results") -> str:
    """An HTML ``<table>``; each body row carries ``data-key`` (the record it shows) and
    right-aligned cells the class ``num``."""
    esc = html.escape
    cls = ["" if a == "l" else ' class="num"' for a in table.align]
    head = "".join(f"<th{cls[i]}>{esc(h)}</th>" for i, h in enumerate(table.header))
    body = []
    keys = table.keys or ("",) * len(table.rows)
    for key, row in zip(keys, table.rows):
        cells = "".join(f"<td{cls[i]}>{esc(c)}</td>" for i, c in enumerate(row))
        body.append(f'<tr data-key="{esc(key)}">{cells}</tr>')
    return (f'<table class="{esc(css_class)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody>\n</table>")
