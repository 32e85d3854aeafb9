"""Report: results.jsonl validation, tables, byte-identical rebuilds, self-contained HTML."""

import base64
import json
import re
from datetime import datetime, timezone

import pytest

from leanconv.cli import main as cli_main
from leanconv.errors import LeanconvError
from leanconv.report.build import QUICK_BANNER, build_report
from leanconv.runs.results import append_result, read_results
from leanconv.report.tables import budget_tables, channel_pairs, comparison_table

LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]


def _latency(t1, t64, onnx=True):
    return {"torch": {"batch1": t1, "batch64": t64},
            "onnx": {"batch1": t1 * 0.8, "batch64": t64 * 0.7} if onnx else None}


def _entry(key, label, family, target, acc, macs, t64, channels=None, onnx=True):
    return {"kind": "entry", "key": key, "label": label, "family": family, "target": target, "accuracy": acc,
            "params": macs // 100, "macs": macs, "latency_ms": _latency(t64 / 20, t64, onnx),
            "channels": channels, "finetune_epochs": 1, "checkpoint": f"runs/c/{key}/model.safetensors",
            "command": f"leanconv prune runs/c/base.safetensors --method {label} --out runs/c/{key}",
            "seconds": 12.5, "notes": ""}


def synthetic_records():
    """A small valid record: baseline, sensitivity, two budgets of width/3-D entries, two layer variants."""
    base = {"kind": "baseline", "label": "baseline", "model": "resnet20", "dataset": "synthetic",
            "input_shape": [3, 16, 16], "accuracy": 90.0, "params": 272474, "macs": 10_000_000,
            "latency_ms": _latency(0.5, 10.0), "channels": dict(zip(LAYERS, [16, 16, 32, 64])),
            "checkpoint": "runs/c/base.safetensors", "command": "leanconv train --model resnet20 --out runs/c",
            "quick": True, "threads": 1}
    sens = {"kind": "sensitivity", "layers": dict(zip(LAYERS, [0.5, 2.0, 30.0, 400.0])), "probes": 8, "images": 64}
    return [
        base, sens,
        _entry("l1@0.5", "l1", "width", 0.5, 88.25, 5_000_000, 6.0, dict(zip(LAYERS, [16, 8, 16, 40]))),
        _entry("hap@0.5", "hap", "width", 0.5, 89.5, 4_950_000, 6.5, dict(zip(LAYERS, [16, 10, 14, 38]))),
        _entry("hap@0.3", "hap", "width", 0.3, 85.0, 3_000_000, 4.0, dict(zip(LAYERS, [16, 6, 10, 24]))),
        _entry("3d@0.5", "3d", "3d", 0.5, 87.0, 5_010_000, 5.0, {"conv1": 16, "layer1.0.conv1": 12}),
        _entry("scc", "scc g=2 o=0.5", "layer", None, 89.0, 6_000_000, 8.0, onnx=False),
        _entry("psconv", "psconv psd4_p8", "layer", None, 88.0, 5_500_000, 9.0),
    ]


def write_synthetic_results(folder, records=None):
    """Write ``records`` (default: :func:`synthetic_records`) as ``folder/results.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in (records or synthetic_records())]
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_results_groups_records(tmp_path):
    res = read_results(write_synthetic_results(tmp_path))
    assert res["baseline"]["model"] == "resnet20" and res["sensitivity"]["probes"] == 8
    assert [e["key"] for e in res["entries"]] == ["l1@0.5", "hap@0.5", "hap@0.3", "3d@0.5", "scc", "psconv"]


@pytest.mark.parametrize("line, message", [
    ('{"kind": "entry", "key": "x"', "line 3: not valid JSON"),
    ('{"kind": "bogus"}', "line 3: 'kind' must be one of baseline, sensitivity, entry"),
    ('[1, 2]', "line 3: a record must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "line 3: not valid JSON (nested too deep)"),  # not a RecursionError
])
def test_bad_line_is_one_line_error_with_line_number(tmp_path, line, message):
    recs = synthetic_records()
    lines = [json.dumps(recs[0]), json.dumps(recs[1]), line, json.dumps(recs[2])]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LeanconvError) as info:
        read_results(tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text and "results.jsonl" in text


@pytest.mark.parametrize("field, value, message", [
    ("accuracy", "high", "'accuracy' must be a finite number"),
    ("accuracy", 120.0, "'accuracy' must lie in [0, 100]"),
    ("macs", 1.5, "'macs' must be a whole number"),
    ("family", "depth", "'family' must be one of width, 3d, layer"),
    ("target", None, "'target' must be a MACs fraction in (0, 1] for family 'width'"),
    ("target", 0.0, "'target' must be a MACs fraction in (0, 1], got 0.0"),
    ("latency_ms", {"torch": {"batch1": 1.0}, "onnx": None}, "latency_ms.torch: 'batch64'"),
    ("channels", {"conv1": -3}, "channels['conv1'] must be a non-negative int"),
])
def test_schema_violations_name_field_and_line(tmp_path, field, value, message):
    recs = synthetic_records()
    recs[3] = dict(recs[3], **{field: value})
    write_synthetic_results(tmp_path, recs)
    with pytest.raises(LeanconvError, match=re.escape(message)) as info:
        read_results(tmp_path)
    assert "line 4:" in str(info.value)


def test_file_level_rules(tmp_path):
    recs = synthetic_records()
    write_synthetic_results(tmp_path, recs + [recs[2]])
    with pytest.raises(LeanconvError, match=r"line 9: entry key 'l1@0.5' repeats line 3"):
        read_results(tmp_path)
    write_synthetic_results(tmp_path, recs[1:])
    with pytest.raises(LeanconvError, match="has no baseline record"):
        read_results(tmp_path)
    with pytest.raises(LeanconvError, match="does not exist"):
        read_results(tmp_path / "missing")


def test_append_result_validates_before_writing(tmp_path):
    recs = synthetic_records()
    for rec in recs[2:4]:  # entries may come before the baseline
        append_result(tmp_path, rec)
    append_result(tmp_path, recs[0])
    before = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(LeanconvError, match="a second baseline record"):
        append_result(tmp_path, recs[0])
    with pytest.raises(LeanconvError, match="'accuracy' must be a finite number"):
        append_result(tmp_path, dict(recs[4], accuracy=float("nan")))
    assert (tmp_path / "results.jsonl").read_text() == before
    assert len(read_results(tmp_path)["entries"]) == 2


def test_tables_group_by_budget_with_measured_and_counted_ratios(tmp_path):
    res = read_results(write_synthetic_results(tmp_path))
    tables = budget_tables(res)
    assert [a for a, _, _ in tables] == ["budget-0_5", "budget-0_3", "layer-variants"]
    half = tables[0][2]
    assert half.keys == ("baseline", "l1@0.5", "hap@0.5", "3d@0.5")
    cols = {h: i for i, h in enumerate(half.header)}
    l1 = half.rows[1]
    assert l1[cols["Δ acc (pts)"]] == "-1.75"
    assert l1[cols["MACs (M)"]] == "5.00"
    # records without a side-by-side timing (made before it existed): the ratio of two medians, marked
    assert l1[cols["speedup torch b64"]] == "1.67x*"  # 10 ms / 6 ms
    assert l1[cols["speedup ORT b64"]] == "1.67x*"
    assert l1[cols["MAC ratio"]] == "2.00x"  # 10 M / 5 M, counted
    assert half.rows[0][cols["Δ acc (pts)"]] == "—" and half.rows[0][cols["MAC ratio"]] == "1.00x"
    scc = tables[2][2].rows[1]
    assert scc[0] == "scc g=2 o=0.5" and scc[cols["ORT b64 (ms)"]] == "n/a" and scc[cols["speedup ORT b64"]] == "n/a"


def test_speedup_column_shows_the_side_by_side_timing_with_its_spread():
    base = synthetic_records()[0]
    entry = _entry("l1@0.5", "l1", "width", 0.5, 88.0, 5_000_000, 6.0)
    entry["speedup"] = {"torch": {"batch64": {"median": 1.8, "low": 1.7, "high": 1.9}}, "onnx": None}
    table = comparison_table(base, [entry])
    cols = {h: i for i, h in enumerate(table.header)}
    assert table.rows[1][cols["speedup torch b64"]] == "1.80x (1.70-1.90)"  # not 10 ms / 6 ms
    assert table.rows[1][cols["speedup ORT b64"]] == "1.67x*"  # no side-by-side timing on ONNX Runtime
    assert table.rows[0][cols["speedup torch b64"]] == "1.00x"


def test_same_label_twice_in_one_table_shows_keys():
    base = synthetic_records()[0]
    a = _entry("l1@0.5", "l1", "width", 0.5, 88.0, 5_000_000, 6.0)
    b = _entry("l1@0.5-r8", "l1", "width", 0.5, 87.0, 5_000_000, 6.0)
    table = comparison_table(base, [a, b])
    assert [r[0] for r in table.rows] == ["baseline", "l1 [l1@0.5]", "l1 [l1@0.5-r8]"]


def test_channel_pairs_mark_removed_and_new_layers():
    pairs = channel_pairs({"a": 16, "b": 32}, {"a": 8, "implant": 4})
    assert pairs == {"a": (16, 8), "b": (32, 0), "implant": (0, 4)}


def _without_stamp(text):
    lines = text.splitlines()
    stamped = [i for i, line in enumerate(lines) if "Built:" in line]
    assert len(stamped) == 1
    return lines[:stamped[0]] + lines[stamped[0] + 1:], lines[stamped[0]]


def test_rebuild_is_identical_except_the_stamp(tmp_path):
    write_synthetic_results(tmp_path)
    first = build_report(tmp_path, now=datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    html1, md1 = first["html"].read_text(), first["markdown"].read_text()
    pngs1 = {k: p.read_bytes() for k, p in first.items() if k not in ("html", "markdown")}
    second = build_report(tmp_path, now=datetime(2025, 6, 7, 8, 9, 10, tzinfo=timezone.utc))
    assert set(first) == set(second) == {"html", "markdown", "accuracy_vs_macs", "accuracy_vs_latency",
                                         "channels", "sensitivity"}
    assert {k: p.read_bytes() for k, p in second.items() if k not in ("html", "markdown")} == pngs1
    for old, new in ((html1, second["html"].read_text()), (md1, second["markdown"].read_text())):
        (old_rest, old_stamp), (new_rest, new_stamp) = _without_stamp(old), _without_stamp(new)
        assert old_rest == new_rest
        assert "2024-01-02 03:04:05 UTC" in old_stamp and "2025-06-07 08:09:10 UTC" in new_stamp
    # same time -> same bytes
    third = build_report(tmp_path, now=datetime(2025, 6, 7, 8, 9, 10, tzinfo=timezone.utc))
    assert third["html"].read_bytes() == second["html"].read_bytes()


def test_html_is_self_contained_and_markdown_links_files(tmp_path):
    write_synthetic_results(tmp_path)
    paths = build_report(tmp_path)
    page = paths["html"].read_text()
    assert QUICK_BANNER in page and "resnet20 on synthetic (input 3x16x16)" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "external resource in report.html"
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n") for b in images)
    assert page.count('<tr data-key="') == 4 + 2 + 3 + 4  # budgets 0.5, 0.3, layer variants; channels
    md = paths["markdown"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["figures/accuracy_vs_macs.png", "figures/accuracy_vs_latency.png", "figures/channels.png",
                     "figures/sensitivity.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert md.count("leanconv prune runs/c/base.safetensors") == 6  # one reproduce command per entry
    assert "hap [hap@0.5]: the most accurate width or 3-D model (89.50% test accuracy)" in md


def test_optional_parts_disappear_and_stale_figures_go(tmp_path):
    recs = synthetic_records()
    write_synthetic_results(tmp_path)
    build_report(tmp_path)
    base = dict(recs[0], quick=False)
    write_synthetic_results(tmp_path, [base] + recs[6:])  # only layer variants, no sensitivity
    paths = build_report(tmp_path)
    assert set(paths) == {"html", "markdown", "accuracy_vs_macs", "accuracy_vs_latency"}
    assert not (tmp_path / "figures" / "sensitivity.png").exists() and not (tmp_path / "figures/channels.png").exists()
    md = paths["markdown"].read_text()
    assert QUICK_BANNER not in md and "Hessian sensitivity" not in md and "Layer variants" in md


def _main_with(monkeypatch, name):
    """``leanconv.cli.main.main`` with subcommand ``name`` registered (the lead lists it)."""
    if name not in cli_main.SUBCOMMANDS:
        monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, name])
    return cli_main.main


def test_cli_report(tmp_path, capsys, monkeypatch):
    main = _main_with(monkeypatch, "report")
    write_synthetic_results(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and (tmp_path / "report.md").is_file()
    (tmp_path / "results.jsonl").write_text('{"kind": "baseline"}\n')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanconv: error:") and "line 1:" in err and "\n" not in err


def test_a_latency_budget_title_names_a_mac_budget_only_for_a_3d_entry_that_took_one():
    from leanconv.report.tables import _budget_title

    timing = {"budget": "latency", "runtime": "onnxruntime", "batch": 1}
    timed = [{"family": "width", "budget": "latency"}, {"family": "3d", "budget": "latency"}]
    assert _budget_title(0.5, timing, timed) == ("Latency budget 50% of the baseline on onnxruntime, batch 1 "
                                                 "(target 0.5)")
    on_macs = [{"family": "width", "budget": "latency"}, {"family": "3d", "budget": "macs"}]  # another device's table
    assert _budget_title(0.5, timing, on_macs).endswith("(target 0.5; 3-D pruning: MACs 0.5)")
    assert _budget_title(0.5, None, on_macs) == "MACs budget 50% of the baseline (target 0.5)"
