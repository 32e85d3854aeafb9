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
                 "--repeats", "2", "--score-images", "64", "--out", str(out), "--no-progress", *extra])
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
    for key in ("before", "after", "speedup_batch64", "speedup_batch64_bn_folded", "mac_reduction", "layers"):
        assert key in record
    assert record["after"]["latency_ms"]["batch64_bn_folded"]["bn_folded"] is True
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
                 "--no-progress"]) == 0
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
                 "--out", str(out), "--no-progress"]) == 0
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
    # shrinking moves each estimate toward the layer's mean, never past it
    mean = sum(channel["trace"]) / 16
    assert all(abs(s - mean) <= abs(t - mean) + 1e-6 and (s - mean) * (t - mean) >= 0
               for t, s in zip(channel["trace"], channel["trace_shrunk"]))
    assert (out / "sensitivity.png").stat().st_size > 1000
    # a second run hits the cache and returns the same numbers
    assert main(["sensitivity", str(trained_ckpt), "--probes", "8", "--images", "64", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "sensitivity.json").read_text())["layers"] == record["layers"]
