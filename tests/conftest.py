"""Shared fixtures: tiny models and data so that every test runs in seconds."""

import pytest
import torch
from torch import nn

from leanconv.data import load_dataset


# Small tensors run faster on one thread, and the suite is not a benchmark.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    """Latency tables that tests build go to a folder of the session, never the user's cache
    (children the tests start inherit it)."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts seeded and on one thread (tiny ops thrash when several processes
    share two cores); a test that changes the thread count gets it restored."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def run_cli(capsys):
    """``run_cli(argv)`` -> (exit status, stdout lines, stderr lines) of ``leanconv argv`` run in
    this process; argparse's own refusals (a ``SystemExit``) give their status too."""
    from leanconv.cli.main import main

    def run(argv):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        out, err = capsys.readouterr()
        return code, out.strip().splitlines(), err.strip().splitlines()
    return run


@pytest.fixture(scope="session")
def tiny_data():
    """A small synthetic dataset (3x16x16, few hundred images)."""
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """A ResNet-20 trained for 2 epochs on the synthetic set, saved by ``leanconv train``."""
    from leanconv.cli.main import main

    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--model", "resnet20", "--data", "synthetic", "--epochs", "2", "--lr", "0.05",
                 "--out", str(out), "--no-progress"]) == 0
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def untrained_ckpt(tmp_path_factory):
    """An untrained ResNet-20 for the synthetic data (3x16x16, 4 classes), saved as a checkpoint:
    for options that are refused before any work."""
    from leanconv import checkpoint
    from leanconv.models import create

    torch.manual_seed(0)
    model = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    model.leanconv_meta = {**model.leanconv_meta, "input_shape": [3, 16, 16], "num_classes": 4,
                           "dataset": {"name": "synthetic", "data_dir": None}}
    path = tmp_path_factory.mktemp("untrained") / "model.safetensors"
    checkpoint.save(model, path)
    return path


def edited_resnet() -> nn.Module:
    """ResNet-20 for 3x16x16 and 4 classes with an edit of each leanconv layer kind (pSConv,
    depthwise + SCC, an implant) and a plain one (a Linear without bias)."""
    from leanconv.layers.implant import ImplantConv2d
    from leanconv.layers.periodic_sparse import PeriodicSparseConv2d
    from leanconv.layers.sliding_channel import SlidingChannelConv2d
    from leanconv.models import create

    model = create("resnet20", num_classes=4, input_size=16)
    model.fc = nn.Linear(64, 4, bias=False)
    model.layer1[0].conv2 = PeriodicSparseConv2d(16, 16, pattern="psd2_p8")
    model.layer2[0].conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                          SlidingChannelConv2d(32, 32, groups=2, overlap=0.5))
    model.layer3[0].conv2 = ImplantConv2d(64, 60, 4, 3, padding=1, channel_order=[*range(4, 64), *range(4)])
    return model
