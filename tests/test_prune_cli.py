"""``leanconv prune`` and ``leanconv sensitivity`` end to end on a tiny trained model."""

import json

import pytest
import torch

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.cost import count, simd_channels


def _logits(model, shape):
    torch.manual_seed(0)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("method,extra", [("l1", []), ("hap", ["--implant", "0.2", "--probes", "8"]),
                                          ("taylor", ["--steps", "2", "--finetune-epochs", "2"]),
                                          ("hap", ["--normalize", "mean", "--probes", "8"]),
                                          ("l2", ["--latency-aware"]), ("l1", ["--round-to", "auto"]),
                                          ("l1", ["--implant", "0.2", "--implant-init", "fit"])])
def test_prune_meets_budget_and_reloads(trained_ckpt, tmp_path, capsys, method, extra):
    out = tmp_path / method
    code = main(["prune", str(trained_ckpt), "--method", method, "--target-flops", "0.5", "--finetune-epochs", "1",
                 "--repeats", "2", "--score-images", "64", "--reconstruct-images", "32", "--out", str(out), "--no-progress",
                 *extra])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    record = json.loads((out / "record.json").read_text())
    base = checkpoint.load(trained_ckpt)
    shape = tuple(base.leanconv_meta["input_shape"])
    pruned = checkpoint.load(out / "model.safetensors")
    macs0, macs1 = count(base, shape).macs, count(pruned, shape).macs
    assert abs(macs1 / macs0 - 0.5) <= 0.02 * 0.5
    assert summary["macs"] == [macs0, macs1] and record["after"]["macs"] == macs1
    assert count(pruned, shape).params < count(base, shape).params
    assert (out / "channels.png").stat().st_size > 1000
    for key in ("before", "after", "speedup_batch1", "speedup_batch64", "mac_reduction", "layers", "timing"):
        assert key in record
    timing = record["timing"]  # the two models timed side by side, on the run's runtime
    assert timing["runtime"] == "onnxruntime" and timing["threads"] == 1 and timing["cpu"]
    assert record["speedup_batch64"] == timing["batch64"]["speedup"]["median"]
    assert timing["batch64"]["speedup"]["low"] <= record["speedup_batch64"] <= timing["batch64"]["speedup"]["high"]
    assert record["after"]["latency_ms"]["batch64"] == timing["batch64"]["latency_ms"]["after"]
    # the saved file rebuilds the very model that was measured
    again = checkpoint.load(out / "model.safetensors")
    torch.testing.assert_close(_logits(again, shape), _logits(pruned, shape), rtol=0, atol=0)
    assert record["config"]["latency_aware"] == ("--latency-aware" in extra)
    note = "--round-to auto gives more speed" in captured.err
    assert note == ("--round-to" not in extra and any(a != b and a % simd_channels() for b, a in record["layers"].values()))
    if "--round-to" in extra:  # auto: this CPU's vector width, and every conv keeps a multiple of it
        assert record["config"]["round_to"] == simd_channels()
        assert all(m.out_channels % simd_channels() == 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    if "--implant" in extra:
        assert any(e["module"]["type"] == "ImplantConv2d" for e in checkpoint.read_header(out / "model.safetensors")["edits"])
        assert bool(record["rounds"][-1]["implant_fit"]) == ("fit" in extra)


def test_impossible_target_fails_before_work(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "nope"
    code = main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.001", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unreachable" in err[0]
    assert not (out / "model.safetensors").exists()


def test_implant_lost_to_rounding_is_reported(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "implant16"
    assert main(["prune", str(trained_ckpt), "--method", "hap", "--target-flops", "0.5", "--implant", "0.1",
                 "--round-to", "16", "--probes", "4", "--score-images", "32", "--repeats", "1", "--out", str(out),
                 "--reconstruct-images", "32", "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert not any(any(r["implanted"].values()) for r in record["rounds"])
    assert "--implant 0.1 implanted no channels (with --round-to 16" in capsys.readouterr().err


def test_round_to_rejects_words(trained_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(trained_ckpt), "--target-flops", "0.5", "--round-to", "fast", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "positive whole number or 'auto'" in err


def test_target_params(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "params"
    assert main(["prune", str(trained_ckpt), "--method", "l2", "--target-params", "0.4", "--repeats", "1",
                 "--reconstruct-images", "32", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert abs(record["achieved"]["params"] - 0.4) <= 0.02 * 0.4


def test_sensitivity_writes_json_and_plot(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", str(trained_ckpt), "--probes", "8", "--images", "64", "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "sensitivity.json").read_text())
    assert record["probes"] >= 8 and "conv1.weight" in record["layers"]
    channel = record["channels"]["layer1.0.conv1.weight"]
    assert len(channel["trace"]) == 16 and len(channel["trace_shrunk"]) == 16
    # shrinking moves each estimate toward the layer's mean, never past it: it lies between the
    # two, up to the rounding of the stored float32 (where the probes cannot tell the channels
    # apart every channel gets the mean itself, which float32 cannot hold exactly)
    mean = sum(channel["trace"]) / 16
    for t, s in zip(channel["trace"], channel["trace_shrunk"]):
        ulp = 2.0 ** -23 * max(abs(t), abs(mean))
        assert min(t, mean) - ulp <= s <= max(t, mean) + ulp
    assert (out / "sensitivity.png").stat().st_size > 1000
    # a second run hits the cache and returns the same numbers
    assert main(["sensitivity", str(trained_ckpt), "--probes", "8", "--images", "64", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "sensitivity.json").read_text())["layers"] == record["layers"]


def _one_line_error(capsys, code, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:") and match in err[0], err


@pytest.mark.parametrize("extra,match", [
    (["--data", "synthetic:n=64,c=1,s=16,k=4"], "takes 3 input channels but synthetic:c=1"),
    (["--data", "synthetic:n=64,c=3,s=16,k=6"], "predicts 4 classes but synthetic:c=3,k=6"),
    (["--out-is-a-file"], "is a file, not a folder"),
])
@pytest.mark.parametrize("command", ["prune", "sensitivity"])
def test_bad_data_or_out_fail_before_work_in_one_line(trained_ckpt, tmp_path, capsys, command, extra, match):
    out = tmp_path / "out"
    if extra == ["--out-is-a-file"]:
        out.write_text("keep me")
        extra = []
    budget = ["--target-flops", "0.5"] if command == "prune" else []
    code = main([command, str(trained_ckpt), *budget, "--out", str(out), "--no-progress", *extra])
    _one_line_error(capsys, code, match)
    assert (out.read_text() == "keep me") if out.is_file() else not out.exists()


def test_sensitivity_probe_settings_are_checked(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sensitivity", str(trained_ckpt), "--probes", "8", "--min-probes", "100", "--out", str(out)])
    _one_line_error(capsys, code, "--min-probes must lie between 2 and --probes (8)")
    for bad in (["--rel-stderr", "-1"], ["--rel-stderr", "nan"]):
        code = main(["sensitivity", str(trained_ckpt), *bad, "--out", str(out)])
        _one_line_error(capsys, code, "--rel-stderr must be a finite number above 0")
    assert not out.exists()


@pytest.mark.parametrize("lr", ["nan", "-0.1", "0"])
def test_finetune_lr_is_checked_up_front(trained_ckpt, tmp_path, capsys, lr):
    code = main(["prune", str(trained_ckpt), "--target-flops", "0.5", "--finetune-lr", lr, "--out", str(tmp_path / "x")])
    _one_line_error(capsys, code, "--finetune-lr must be a finite number above 0")
    assert not (tmp_path / "x").exists()


def test_stdout_is_only_the_json_summary(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "quiet"
    assert main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.5", "--repeats", "1",
                 "--score-images", "32", "--reconstruct-images", "32", "--out", str(out)]) == 0  # progress on: stderr
    captured = capsys.readouterr()
    assert json.loads(captured.out)["out"] == str(out)
    assert "leanconv: measuring the unpruned model" in captured.err


def test_implanted_model_is_not_pruned_again_and_says_why(trained_ckpt, tmp_path, capsys):
    first = tmp_path / "implanted"
    assert main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.5", "--implant", "0.5",
                 "--repeats", "1", "--score-images", "32", "--out", str(first), "--no-progress"]) == 0
    capsys.readouterr()
    header = checkpoint.read_header(first / "model.safetensors")
    assert any(e["module"]["type"] == "ImplantConv2d" for e in header["edits"])
    code = main(["prune", str(first / "model.safetensors"), "--method", "l1", "--target-flops", "0.7",
                 "--out", str(tmp_path / "again"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Neural Implant" in err and len(err.strip().splitlines()) == 1


def test_keep_unprunable_prunes_the_rest_of_a_user_model(tmp_path, capsys):
    """A layer leanconv cannot resize stops the run with a one-line error that names the way
    out; ``--keep-unprunable`` keeps those channels and prunes the rest."""
    from leanconv.models import from_constructor

    model = from_constructor("prune_toys:RollToy")
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 2}
    ckpt = tmp_path / "scale.safetensors"
    checkpoint.save(model, ckpt)
    args = ["prune", str(ckpt), "--constructor", "prune_toys:RollToy", "--method", "l1", "--target-params", "0.875",
            "--data", "synthetic:n=64,c=3,s=16,k=2", "--repeats", "1", "--score-images", "32", "--no-progress"]
    _one_line_error(capsys, main([*args, "--out", str(tmp_path / "strict")]), "--keep-unprunable")
    assert main([*args, "--keep-unprunable", "--out", str(tmp_path / "kept")]) == 0
    pruned = checkpoint.load(tmp_path / "kept" / "model.safetensors", constructor="prune_toys:RollToy")
    assert pruned.conv1.out_channels == 6 and pruned.conv2.out_channels < 5  # the rolled channels stay


def test_a_folder_in_the_way_of_a_result_file_is_one_line(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "blocked"
    (out / "record.json").mkdir(parents=True)  # a folder where the record should go
    code = main(["prune", str(trained_ckpt), "--method", "l1", "--target-flops", "0.5", "--repeats", "1",
                 "--score-images", "32", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:") and "record.json" in err[0], err
    assert sorted(p.name for p in out.iterdir() if p.name != ".leanconv") == ["record.json"]  # the set is written whole or not at all


def test_result_files_are_written_as_a_set(tmp_path):
    """A writer that fails leaves the previous files, not a mix of old and new."""
    from leanconv.util.fileset import write_together

    write_together(tmp_path, {"a.txt": lambda p: p.write_text("old a"), "b.txt": lambda p: p.write_text("old b")})

    def broken(path):
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_together(tmp_path, {"a.txt": lambda p: p.write_text("new a"), "b.txt": broken})
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == {"a.txt": "old a", "b.txt": "old b"}
