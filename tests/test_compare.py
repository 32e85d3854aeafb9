"""``leanconv compare`` / ``demo`` / ``report`` end to end on tiny synthetic data."""

import json
import re

import pytest

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.report.results import read_results


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def compared(trained_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", str(trained_ckpt), "--methods", "l1,hap+implant,3d,scc", "--target-flops", "0.5",
            "--probes", "8", "--score-images", "64", "--samples", "4", "--train-subset", "128", "--quick",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_compare_writes_every_entry_and_the_report(compared):
    out, _ = compared
    results = read_results(out)
    assert [e["key"] for e in results["entries"]] == ["l1@0.5", "hap+implant@0.5", "3d@0.5", "scc"]
    base = results["baseline"]
    for entry in results["entries"]:
        assert entry["macs"] < base["macs"]
        assert entry["latency_ms"]["onnx"]["batch64"] > 0
        model = checkpoint.load(entry["checkpoint"])
        assert sum(p.numel() for p in model.parameters()) == entry["params"]
        if entry["family"] != "layer":
            assert entry["macs"] <= 0.5 * base["macs"] * 1.02
    assert results["sensitivity"]["layers"]
    html = (out / "report.html").read_text()
    assert "QUICK RUN" in html and html.count("data:image/png;base64,") >= 3
    for label in ("l1", "hap+implant", "3d", "scc g=2 o=0.5"):
        assert f">{label}<" in html


def test_compare_resumes_without_redoing(compared, capsys):
    out, argv = compared
    before = (out / "results.jsonl").read_text()
    stamp = (out / "entries" / "l1@0.5" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "results.jsonl").read_text() == before
    assert (out / "entries" / "l1@0.5" / "model.safetensors").stat().st_mtime_ns == stamp


def test_report_rebuilds_identically_from_results(compared, capsys):
    out, _ = compared
    old = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    new = (out / "report.html").read_text()
    strip = lambda text: re.sub(r"Built: [^<\n]*", "", text)
    assert strip(new) == strip(old)


def test_compare_refuses_unknown_method(trained_ckpt, tmp_path, capsys):
    code = main(["compare", str(trained_ckpt), "--methods", "l1,magic", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "magic" in err[0]
    assert not (tmp_path / "x" / "results.jsonl").exists()


def test_demo_quick_on_synthetic_reuses_its_baseline(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", "synthetic", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"].endswith("report.html") and (out / "report.html").exists()
    stamp = (out / "baseline" / "model.safetensors").stat().st_mtime_ns
    (out / "report.html").unlink()
    assert main(argv) == 0
    assert (out / "baseline" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "report.html").exists()
