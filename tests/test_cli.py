"""The command line: help, the main subcommands on tiny data, and one-line errors with exit code 2."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from leanconv import checkpoint
from leanconv.cli.main import main


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refused an argument
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(capsys, *argv, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("leanconv: error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = main(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    return out


def test_train_writes_model_metrics_and_config(trained):
    assert (trained / "model.safetensors").exists()
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["val_accuracy"] <= 100
    config = json.loads((trained / "config.json").read_text())
    assert config["train_config"]["epochs"] == 1
    meta = checkpoint.read_header(trained / "model.safetensors")["meta"]
    assert meta["dataset"]["name"].startswith("synthetic") and meta["input_shape"] == [3, 16, 16]


def test_eval_json_uses_the_recorded_dataset(trained, capsys):
    code, out, _ = _run(capsys, "eval", str(trained / "model.safetensors"), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["dataset"].startswith("synthetic") and 0 <= result["accuracy"] <= 100 and result["n"] == 128


def test_profile_json_has_the_required_keys(capsys):
    code, out, _ = _run(capsys, "profile", "resnet20", "--input-shape", "3,32,32", "--json", "--repeats", "2")
    assert code == 0
    result = json.loads(out)
    assert {"params", "macs", "flops", "latency_ms", "layers"} <= set(result)
    assert {"batch1", "batch64"} <= set(result["latency_ms"])
    assert abs(result["params"] / 0.27e6 - 1) < 0.02 and abs(result["macs"] / 40.8e6 - 1) < 0.02
    assert result["flops"] == 2 * result["macs"]


def test_profile_of_a_checkpoint_uses_its_input_shape(trained, capsys):
    code, out, _ = _run(capsys, "profile", str(trained / "model.safetensors"), "--json", "--no-latency")
    assert code == 0 and json.loads(out)["input_shape"] == [3, 16, 16]


def test_user_errors_are_one_line(tmp_path, capsys, trained):
    _assert_user_error(capsys, "profile", "resnet999", match="resnet999")
    _assert_user_error(capsys, "train", "--model", "nope", "--data", "synthetic", "--out", str(tmp_path / "x"),
                       match="'nope' is neither a checkpoint file nor a zoo model")
    _assert_user_error(capsys, "train", "--data", "mnist-ish", "--out", str(tmp_path / "x"), match="unknown dataset")
    _assert_user_error(capsys, "train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none"),
                       "--out", str(tmp_path / "x"), match="none")
    _assert_user_error(capsys, "profile", "resnet20", "--input-shape", "3,1,1", "--no-latency", match="input_size")
    _assert_user_error(capsys, "profile", str(trained / "model.safetensors"), "--input-shape", "1,16,16",
                       "--no-latency", match="shape")
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(pickle.dumps({"a": 1}))
    _assert_user_error(capsys, "eval", str(bomb), match="not a leanconv checkpoint")
    good = (trained / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[: len(good) // 3])
    _assert_user_error(capsys, "eval", str(cut), match="cut.safetensors")
    _assert_user_error(capsys, "eval", str(trained / "model.safetensors"), "--data", "fashion-mnist",
                       match="input channels")


def test_bad_arguments_exit_2_and_overwrite_nothing(trained, capsys):
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "0", "--data", "synthetic", "--out", str(trained)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--epochs" in err
    assert (trained / "model.safetensors").read_bytes() == before


def test_resume_without_state_is_an_error(tmp_path, capsys):
    _assert_user_error(capsys, "train", "--data", "synthetic", "--out", str(tmp_path / "fresh"), "--resume",
                       match="nothing to resume")


def test_entry_point_help():
    exe = Path(sys.executable).with_name("leanconv")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("train", "eval", "profile"):
        assert command in result.stdout


def test_more_user_errors_fail_before_work(tmp_path, capsys, trained):
    ckpt = str(trained / "model.safetensors")  # ResNet-20 on synthetic: 3 x 16 x 16, 4 classes
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for command in (["train", "--data", "synthetic"], ["convert", "resnet20", "--to", "scc"]):
        _assert_user_error(capsys, *command, "--out", str(afile), match="is a file, not a folder")
    _assert_user_error(capsys, "train", "--from", ckpt, "--data", "synthetic:k=6", "--out", str(tmp_path / "k6"),
                       match="predicts 4 classes")
    _assert_user_error(capsys, "prune3d", ckpt, "--target-flops", "0.5", "--data", "synthetic:c=1",
                       "--out", str(tmp_path / "p3"), match="takes 3 input channels")
    _assert_user_error(capsys, "prune3d", ckpt, "--target-flops", "0.5", "--data", "synthetic:k=2",
                       "--out", str(tmp_path / "p3"), match="predicts 4 classes")
    _assert_user_error(capsys, "export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--input-shape", "1,16,16",
                       "--no-latency", match="failed on an input of shape (1, 16, 16)")
    _assert_user_error(capsys, "export", ckpt, "--onnx", str(tmp_path), "--no-latency", match="is a folder")
    _assert_user_error(capsys, "fold", ckpt, "--out", str(tmp_path), match="is a folder")
    _assert_user_error(capsys, "profile", "resnet20", "--input-shape", "3,100000,100000", "--no-latency",
                       match="argument --input-shape: input shape C,H,W needs C in [1, 256], H and W in [1, 1024]")
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written by any of them
    for bad in (["--momentum", "1"], ["--momentum", "nan"], ["--weight-decay", "-1"], ["--weight-decay", "inf"]):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--data", "synthetic", *bad, "--out", str(tmp_path / "x")])
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err
    _assert_user_error(capsys, "prune3d", ckpt, "--target-flops", "0.5", "--min-blocks-per-stage", "0",
                       "--out", str(tmp_path / "x"), match="--min-blocks-per-stage must be at least 1")


def test_train_from_a_checkpoint_uses_its_data(tmp_path, capsys, trained):
    """Without --data, ``train --from`` trains on the data the checkpoint records (synthetic
    here), not the default fashion-mnist, which would not even fit its 3 input channels."""
    out = tmp_path / "more"
    code, stdout, err = _run(capsys, "train", "--from", str(trained / "model.safetensors"), "--epochs", "1",
                             "--out", str(out), "--no-progress")
    assert code == 0, err
    assert checkpoint.read_header(out / "model.safetensors")["meta"]["dataset"]["name"] == "synthetic"
    assert json.loads(stdout)["model"] == str(out / "model.safetensors")


def test_weights_broken_by_the_last_step_are_not_saved(tmp_path, capsys):
    """A loss that is finite at every step can still leave non-finite weights after the last
    update (here the highest learning rate leanconv takes); the epoch must not be written."""
    out = tmp_path / "blowup"
    code, _, err = _run(capsys, "train", "--data", "synthetic:n=256", "--epochs", "1", "--batch-size", "64",
                        "--lr", "1000", "--out", str(out), "--no-progress")  # the highest rate --lr takes
    assert code == 2 and "diverged" in err and len(err.strip().splitlines()) == 1
    assert not (out / "model.safetensors").exists()
    _assert_user_error(capsys, "train", "--data", "synthetic:n=64", "--batch-size", "64", "--out", str(out),
                       match="less than one full batch")


def test_file_system_errors_are_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    import leanconv.cli.eval as eval_cli

    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(eval_cli, "run", full_disk)
    code, out, err = _run(capsys, "eval", "resnet20")
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1 and "No space left on device" in lines[0], err


def test_an_unknown_option_points_to_the_subcommands_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune3d", "x.safetensors", "--target-params", "0.5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "unrecognized arguments: --target-params 0.5" in err[0] and "'leanconv prune3d --help'" in err[0]


def test_progress_bar_names_each_stage(capsys):
    """A long run's bar says which stage it is in (compare once labelled every stage "fine-tune")."""
    from leanconv.cli.common import progress_bar

    update, close = progress_bar("compare")
    update(3, 64, {"stage": "damage"})
    update(1, 3, {"stage": "candidates"})
    update(2, 5, {"epoch": 1, "loss": 0.5})
    close()
    err = capsys.readouterr().err
    assert "compare: damage" in err and "3/64" in err
    assert "compare: candidates" in err and "stage=" not in err
    assert "compare:  40%" in err or "compare: 40%" in err  # no stage: the plain label
    update, close = progress_bar("quiet", enabled=False)
    update(1, 2, {"stage": "damage"})
    close()
    assert capsys.readouterr().err == ""


def test_commands_run_with_freed_memory_kept(monkeypatch, tmp_path, capsys):
    """A command sets the allocator that timing on torch uses, once its arguments are checked."""
    from leanconv.cost import runtimes

    calls = []
    monkeypatch.setattr(runtimes, "steady_allocator", lambda: calls.append(1))
    assert main(["eval", ""]) == 2  # refused while checking the arguments: nothing set
    assert calls == []
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2  # refused by the command itself
    assert calls == [1]
    assert "missing.safetensors" in capsys.readouterr().err
