"""``leanconv compare`` / ``demo`` / ``report`` end to end on tiny synthetic data."""

import hashlib
import json
import re
import shlex
import shutil

import pytest
import torch

from leanconv import checkpoint
from leanconv.cli.main import build_parser, main
from leanconv.runs.compare import CompareConfig, entry_config, entry_keys
from leanconv.errors import LeanconvError
from leanconv.runs.results import read_results


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def compared(trained_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", str(trained_ckpt), "--methods", "l1,hap+implant,3d,scc", "--target-flops", "0.5",
            "--probes", "8", "--score-images", "64", "--samples", "4", "--train-subset", "128", "--quick",
            "--reconstruct-images", "32",
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


def test_demo_quick_on_synthetic_reuses_its_baseline(tmp_path, capsys, monkeypatch):
    """The demo chooses its latency target itself: one that the comparison then finds out of
    reach (the unpruned model timed again, slower) moves on to the next milder target, and
    past the mildest to half the MACs; a re-run resumes with the budget the folder holds."""
    from leanconv.cli import demo
    from leanconv.errors import UnreachableLatency

    tried, real = [], demo.compare_and_report

    def first_out_of_reach(source, config, out, **kwargs):
        tried.append((config.budget, config.targets[0]))
        if len(tried) == 1:
            raise UnreachableLatency("latency target is unreachable")
        return real(source, config, out, **kwargs)

    monkeypatch.setattr(demo, "compare_and_report", first_out_of_reach)
    monkeypatch.setattr(demo, "_latency_target", lambda *a: demo.LATENCY_TARGETS[-1])  # the mildest: MACs next
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", "synthetic", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"].endswith("report.html") and (out / "report.html").exists()
    assert tried == [("latency", demo.LATENCY_TARGETS[-1]), ("macs", 0.5)] and printed["budget"] == "macs 0.5"
    stamp = (out / "baseline" / "model.safetensors").stat().st_mtime_ns
    (out / "report.html").unlink()
    assert main(argv) == 0
    assert tried[2:] == [("macs", 0.5)]  # resumed at the folder's budget
    assert (out / "baseline" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "report.html").exists()


# --- run identity, reproducing commands, duplicated budgets, empty methods ---------------------


def _snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _other_checkpoint(ckpt, path):
    """``ckpt`` with one weight nudged: the same model, file name aside, but other content."""
    model = checkpoint.load(ckpt)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    checkpoint.save(model, path)
    return path


def _with(argv, **options):
    """``argv`` with each ``--option`` in ``options`` (underscores for dashes) set: replaced, or added."""
    argv = list(argv)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def test_compare_records_the_run_identity_first(compared, trained_ckpt):
    out, _ = compared
    first = _lines(out / "results.jsonl")[0]
    assert first["kind"] == "run" and first["adopted"] is False
    identity = read_results(out)["run"]["identity"]
    assert identity["checkpoint_sha256"] == hashlib.sha256(trained_ckpt.read_bytes()).hexdigest()
    assert identity["dataset"] == "synthetic" and identity["input_shape"] == [3, 16, 16]
    assert (identity["finetune_epochs"], identity["train_subset"], identity["probes"]) == (1, 128, 8)


def test_compare_refuses_a_folder_made_from_another_checkpoint(compared, trained_ckpt, tmp_path, capsys):
    out, argv = compared
    other = _other_checkpoint(trained_ckpt, tmp_path / "other.safetensors")
    before = _snapshot(out)
    assert main([argv[0], str(other), *argv[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint_sha256" in err[0] and "new --out" in err[0]
    assert _snapshot(out) == before


@pytest.mark.parametrize("option, value, named", [
    ("--finetune-epochs", "2", "finetune_epochs 1 there, 2 now"),
    ("--finetune-lr", "0.05", "finetune_lr 0.01 there, 0.05 now"),
    ("--train-subset", "64", "train_subset 128 there, 64 now"),
    ("--score-images", "32", "score_images 64 there, 32 now"),
    ("--probes", "4", "probes 8 there, 4 now"),
    ("--seed", "1", "seed 0 there, 1 now"),
    ("--data", "synthetic:n=256", 'dataset "synthetic" there, "synthetic:n=256" now'),
])
def test_compare_refuses_a_folder_made_with_other_settings(compared, option, value, named, capsys):
    out, argv = compared
    before = _snapshot(out)
    assert main(_with(argv, **{option[2:]: value})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "use a new --out" in err[0]
    assert _snapshot(out) == before


def test_compare_adds_a_budget_to_a_matching_folder_once(compared, tmp_path, capsys):
    out, argv = compared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "results.jsonl").read_text()
    baseline = _snapshot(copy / "entries" / "baseline")
    assert main(_with(argv, methods="l1", target_flops="0.4,0.4", out=str(copy))) == 0
    after = (copy / "results.jsonl").read_text()
    assert after.startswith(before)  # nothing rewritten: baseline, sensitivity and old entries reused
    assert [r["key"] for r in _lines(copy / "results.jsonl")[len(_lines(out / "results.jsonl")):]] == ["l1@0.4"]
    assert _snapshot(copy / "entries" / "baseline") == baseline
    assert ">l1<" in (copy / "report.html").read_text()


def test_compare_adopts_a_folder_from_before_run_records(compared, tmp_path, capsys):
    out, argv = compared
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    lines = (copy / "results.jsonl").read_text().splitlines(keepends=True)
    (copy / "results.jsonl").write_text("".join(l for l in lines if '"kind": "run"' not in l))
    assert read_results(copy)["run"] is None
    assert main(_with(argv, out=str(copy))) == 0  # resumes: nothing to redo
    run = read_results(copy)["run"]
    assert run["adopted"] is True and run["identity"]["finetune_epochs"] == 1
    assert [r["kind"] for r in _lines(copy / "results.jsonl")][-1] == "run"
    assert main(_with(argv, finetune_epochs="3", out=str(copy))) == 2  # from now on it is checked


def test_written_commands_carry_every_setting_of_the_row(compared):
    out, _ = compared
    parser = build_parser()
    entries = {e["key"]: e for e in read_results(out)["entries"]}
    prune = parser.parse_args(shlex.split(entries["l1@0.5"]["command"])[1:])
    assert (prune.train_subset, prune.data, prune.seed, prune.finetune_epochs, prune.finetune_lr) == \
        (128, "synthetic", 0, 1, 0.01)
    convert = parser.parse_args(shlex.split(entries["scc"]["command"])[1:])  # converts, fits and fine-tunes
    assert (convert.seed, convert.train_subset, convert.data, convert.finetune_epochs, convert.finetune_lr) == \
        (0, 128, "synthetic", 1, 0.01)
    assert "fitted to the trained ones" in entries["scc"]["notes"]
    prune3d = parser.parse_args(shlex.split(entries["3d@0.5"]["command"])[1:])
    assert (prune3d.data, prune3d.seed, prune3d.sample_images) == ("synthetic", 0, 128)
    assert "all training images" in entries["3d@0.5"]["notes"]


@pytest.mark.parametrize("key", ["l1@0.5", "scc"])
def test_written_command_reproduces_its_row(compared, key, tmp_path, capsys):
    out, _ = compared
    entry = next(e for e in read_results(out)["entries"] if e["key"] == key)
    command = entry["command"].replace(str(out / "entries" / key), str(tmp_path / "again"))
    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    made, again = checkpoint.load(entry["checkpoint"]), checkpoint.load(tmp_path / "again" / "model.safetensors")
    a, b = made.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included


def test_recovery_settings_reach_the_entries_they_apply_to():
    config = CompareConfig(methods=("hap", "3d", "scc"), hessian="hutchinson", distill=True, distill_weight=0.7)
    width, deep, layer = (entry_config(config, m, 0.5) for m in ("hap", "3d", "scc"))
    assert (width.hessian, width.distill, width.distill_weight) == ("hutchinson", True, 0.7)
    assert (layer.distill, layer.distill_weight) == (True, 0.7)
    assert deep.hessian == "hutchinson" and deep.step_settings("synthetic").hessian == "hutchinson"
    plain = entry_config(CompareConfig(methods=("l1",)), "l1", 0.5)
    assert (plain.distill, plain.hessian) == (False, "gauss-newton")
    with pytest.raises(LeanconvError, match="give --finetune-epochs"):
        CompareConfig(distill=True, finetune_epochs=0)
    with pytest.raises(LeanconvError, match="add --distill"):
        CompareConfig(distill_temperature=2.0)


def test_compare_identity_names_recovery_settings_only_when_set(compared, capsys):
    out, argv = compared
    assert not {"hessian", "distill"} & set(read_results(out)["run"]["identity"])  # older folders still resume
    before = _snapshot(out)
    assert main(argv + ["--distill"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill null there, true now" in err[0]
    assert main(_with(argv, hessian="hutchinson")) == 2
    assert 'hessian null there, "hutchinson" now' in capsys.readouterr().err
    assert _snapshot(out) == before


def test_compare_distils_width_and_layer_entries(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(["compare", str(trained_ckpt), "--methods", "l1,scc", "--target-flops", "0.5", "--distill",
                 "--distill-temperature", "2", "--score-images", "64", "--train-subset", "128", "--quick",
                 "--reconstruct-images", "32", "--out", str(out), "--no-progress"]) == 0
    entries = {e["key"]: e for e in read_results(out)["entries"]}
    for key in ("l1@0.5", "scc"):
        assert "distillation from the baseline (T=2, A=0.5)" in entries[key]["notes"]
        record = json.loads((out / "entries" / key / ("convert.json" if key == "scc" else "record.json")).read_text())
        assert record["distillation"]["temperature"] == 2
        assert "--distill" in entries[key]["command"]
    assert read_results(out)["run"]["identity"]["distill"] is True


def test_repeated_methods_and_budgets_run_once():
    config = CompareConfig(targets=(0.5, 0.3, 0.5), methods=("l1", "scc", "l1"))
    assert [k for k, _, _ in entry_keys(config)] == ["l1@0.5", "l1@0.3", "scc"]
    with pytest.raises(LeanconvError, match="share the entry name @0.5"):
        CompareConfig(targets=(0.5, 0.5000001), methods=("l1",))


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_compare_refuses_an_empty_method_list(trained_ckpt, tmp_path, methods, capsys):
    code = main(["compare", str(trained_ckpt), "--methods", methods, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no methods" in err[0]
    assert not (tmp_path / "x").exists()


def test_demo_refuses_a_folder_of_another_plan_before_training(tmp_path, capsys):
    """A folder holding a demo of one plan (here a fake baseline record of the default plan) is
    refused by a ``--quick`` demo before any training, instead of failing after it."""
    from leanconv import checkpoint as ckpt_io
    from leanconv.models import create

    out = tmp_path / "demo"
    model = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    model.leanconv_meta = {"dataset": {"name": "synthetic"}, "demo_plan": {"epochs": 4, "subset": None}}
    ckpt_io.save(model, out / "baseline" / "model.safetensors")
    before = _snapshot(out)
    code = main(["demo", "--quick", "--data", "synthetic", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds a demo made with other settings" in err[0], err
    assert _snapshot(out) == before


@pytest.mark.parametrize("argv, match", [
    (["--methods", "scc", "--scc-groups", "3"], "entry scc: layer layer1.0.conv2: in_channels=16 is not divisible"),
    (["--methods", "l1", "--target-flops", "0.001"], "entry l1@0.001: target 0.001 of the original macs is unreachable"),
    (["--methods", "3d", "--target-flops", "0.01"], "entry 3d@0.01: impossible budget"),
])
def test_compare_refuses_an_entry_that_would_fail_before_any_work(trained_ckpt, tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    code = main(["compare", str(trained_ckpt), *argv, "--no-onnx", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()  # nothing written: the corrected command can use the same folder
