"""Data-parallel training: helpers, DDP in one process (equals plain training, resumes exactly)
and a real two-process ``torchrun`` launch whose replicas end bit-identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from leanconv import checkpoint
from leanconv.train import distributed
from leanconv.cli.main import main
from leanconv.cli.train import CHECKSUM_ENV
from leanconv.data import load_dataset
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.train import TrainConfig, evaluate, fit

TORCHRUN_DATA = "synthetic:n=3000,n_test=300,s=8"  # 300 val / 300 test images: 2 eval batches of 256
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one process, so that the DDP code path runs in-process."""
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def _setup(data, seed=3, init_seed=None):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = create("resnet20", num_classes=data.num_classes, in_channels=data.in_channels,
                   input_size=data.image_size)
    train = data.loader("train", 64, shuffle=True, augment=True, seed=seed, drop_last=True, subset=256)
    return model, train, data.loader("val", 128)


def test_helpers_are_no_ops_in_one_plain_process(no_launch_env):
    assert distributed.init_from_env() == (0, 1)
    assert not distributed.is_initialized() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.all_equal(7)
    distributed.barrier()
    assert distributed.device() == torch.device("cpu")


def test_init_from_env_needs_the_torchrun_variables(no_launch_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LeanconvError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LeanconvError, match="not a whole number"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() == (0, 1) and not distributed.is_initialized()


def test_distributed_fit_needs_a_process_group(tiny_data):
    model, train, _ = _setup(tiny_data)
    with pytest.raises(LeanconvError, match="torchrun"):
        fit(model, train, TrainConfig(epochs=1), distributed=True)


def test_state_checksum_sees_every_bit_but_not_the_memory_format():
    torch.manual_seed(0)
    model = create("resnet20", input_size=8)
    reference = distributed.state_checksum(model)
    assert distributed.state_checksum(model.to(memory_format=torch.channels_last)) == reference
    model.bn1.num_batches_tracked += 1  # a buffer counts too
    assert distributed.state_checksum(model) != reference


def test_ddp_in_one_process_equals_plain_training_and_resumes_exactly(tiny_data, tmp_path, group_of_one):
    config = TrainConfig(epochs=2, lr=0.05, seed=3)
    plain, train, val = _setup(tiny_data)
    rows_plain = fit(plain, train, config, val_loader=val, distributed=False).history

    def interrupt(done, total, info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    model, train, val = _setup(tiny_data)
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, config, val_loader=val, out_dir=tmp_path, progress=interrupt, distributed=True)
    model, train, val = _setup(tiny_data, init_seed=99)  # resume must overwrite this init
    result = fit(model, train, config, val_loader=val, out_dir=tmp_path, resume=True, distributed=True)
    assert result.epochs_run == 1
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr_end"):
        assert [r[key] for r in rows] == [r[key] for r in rows_plain], key
    assert checkpoint.read_header(tmp_path / "train_state.safetensors")["meta"]["world_size"] == 1


def test_resume_refuses_another_number_of_processes(tiny_data, tmp_path):
    model, train, _ = _setup(tiny_data)
    config = TrainConfig(epochs=2, lr=0.05)
    fit(model, train, TrainConfig(epochs=2, lr=0.05), out_dir=tmp_path)
    state = tmp_path / "train_state.safetensors"
    saved, extra = checkpoint.load(state, with_extra=True)
    saved.leanconv_meta["world_size"] = 2
    checkpoint.save(saved, state, extra_tensors=extra)
    with pytest.raises(LeanconvError, match="trained by 2 process"):
        fit(model, train, config, out_dir=tmp_path, resume=True)


def test_sync_batchnorm_view_shares_the_weights(group_of_one, tiny_data):
    torch.manual_seed(0)
    model = create("resnet20", input_size=8).eval()
    view = distributed.sync_batchnorm_view(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in view.modules()) == n_bn
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), view.parameters()))
    assert all(a is b for a, b in zip(model.buffers(), view.buffers()))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(view.eval()(x), model(x), rtol=0, atol=0)
    model, train, _ = _setup(tiny_data)
    with pytest.raises(LeanconvError, match="GPUs only"):
        fit(model, train, TrainConfig(epochs=1, sync_bn=True), distributed=True)


def _torchrun(*program: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", CHECKSUM_ENV: "1", "LEANCONV_DIST_BACKEND": "gloo"}
    for name in LAUNCH_VARS:
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_torchrun_two_processes_train_identical_replicas(tmp_path):
    run = _torchrun("-m", "leanconv.cli.main", "train", "--model", "resnet20", "--data", TORCHRUN_DATA,
                    "--epochs", "2", "--batch-size", "32", "--subset", "256", "--lr", "0.05",
                    "--out", str(tmp_path / "ddp"), "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "ddp"
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only rank 0 prints
    assert sorted(p.name for p in out.iterdir() if p.name != ".leanconv") == [
        "checksum.rank0.txt", "checksum.rank1.txt", "config.json", "metrics.jsonl", "model.safetensors",
        "train_state.safetensors"]
    model = checkpoint.load(out / "model.safetensors")
    checksums = {(out / f"checksum.rank{r}.txt").read_text().strip() for r in (0, 1)}
    assert checksums == {distributed.state_checksum(model)}  # both replicas equal the saved model
    assert model.leanconv_meta["world_size"] == 2 and model.leanconv_meta["epochs_done"] == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    single = tmp_path / "single"
    assert main(["train", "--model", "resnet20", "--data", TORCHRUN_DATA, "--epochs", "1", "--batch-size", "32",
                 "--subset", "64", "--out", str(single), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single_keys = set(json.loads((single / "metrics.jsonl").read_text().splitlines()[0]))
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == single_keys for r in rows)

    # validation and test were split by batches over the two processes and summed: they must
    # equal a single-process evaluation of the saved model
    data = load_dataset(TORCHRUN_DATA)
    assert evaluate(model, data.loader("val", 256))["accuracy"] == rows[-1]["val_accuracy"]
    test = evaluate(model, data.loader("test", 256))
    assert test["accuracy"] == summaries[0]["test_accuracy"]
    assert test["loss"] == pytest.approx(summaries[0]["test_loss"], rel=1e-5)


def _resume_worker(folder: Path) -> None:
    """Run by ``torchrun`` on this file: train 2 epochs; train again, interrupted in epoch 2, then
    resume; write this rank's checksums to ``folder/rank<R>.json``."""
    rank, world = distributed.init_from_env()
    data = load_dataset("synthetic")
    config = TrainConfig(epochs=2, lr=0.05, seed=3)

    def train(out: str, init_seed: int = 3, **kwargs):
        torch.manual_seed(init_seed)
        model = create("resnet20", num_classes=data.num_classes, input_size=data.image_size)
        loader = data.loader("train", 32, shuffle=True, augment=True, seed=3, drop_last=True, rank=rank,
                             world_size=world)
        return model, fit(model, loader, config, val_loader=data.loader("val", 32), out_dir=folder / out, **kwargs)

    def interrupt(done, total, info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    whole, _ = train("whole")
    with pytest.raises(KeyboardInterrupt):
        train("resumed", progress=interrupt)
    resumed, result = train("resumed", init_seed=99, resume=True)
    record = {"whole": distributed.state_checksum(whole), "resumed": distributed.state_checksum(resumed),
              "epochs_run": result.epochs_run}
    (folder / f"rank{rank}.json").write_text(json.dumps(record))
    distributed.cleanup()


@pytest.mark.slow
def test_torchrun_resume_equals_an_uninterrupted_run(tmp_path):
    run = _torchrun(__file__, str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1]  # identical replicas
    assert records[0]["epochs_run"] == 1 and records[0]["resumed"] == records[0]["whole"]
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "resumed")]
    assert len(rows[0]) == 2 and rows[0] == rows[1]


if __name__ == "__main__":
    _resume_worker(Path(sys.argv[1]))
