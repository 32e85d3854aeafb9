"""Shared fixtures: tiny models and data so that every test runs in seconds."""

import pytest
import torch

from leanconv.data import load_dataset


# Small tensors run faster on one thread, and the suite is not a benchmark.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts seeded and on one thread (tiny ops thrash when several processes
    share two cores); a test that changes the thread count gets it restored."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
