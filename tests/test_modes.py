"""eval_mode: eval inside the block, every module's own training flag back afterwards."""

import pytest
from torch import nn

from leanconv.util.modes import eval_mode


def _mixed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.Dropout()))
    model.train()
    model[1].eval()  # frozen BatchNorm inside a training model
    model[2][1].eval()
    return model


def _flags(model):
    return [m.training for m in model.modules()]


def test_eval_inside_and_each_flag_restored():
    model = _mixed()
    before = _flags(model)
    with eval_mode(model) as same:
        assert same is model
        assert not any(_flags(model))
    assert _flags(model) == before == [True, True, False, True, True, False]


def test_flags_restored_when_the_block_raises():
    model = _mixed()
    before = _flags(model)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert _flags(model) == before
