"""Checkpoints: round trips for every zoo model, structural edits, and refusal of bad files."""

import json
import os
import pickle

import pytest
import torch
import torch_pruning as tp
from torch import nn

from leanconv import checkpoint
from leanconv.errors import LeanconvError
from leanconv.models import create, from_constructor, names


def _logits(model, shape=(3, 32, 32)):
    torch.manual_seed(1)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        return model(x)


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", names())
def test_round_trip_every_zoo_model(name, tmp_path):
    model = create(name, num_classes=7, in_channels=3, input_size=32)
    _randomise_bn(model)
    path = tmp_path / "m.safetensors"
    header = checkpoint.save(model, path)
    assert header["edits"] == []
    loaded = checkpoint.load(path)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_pruned_model_is_stored_as_resize_edits(tmp_path):
    model = create("resnet20")
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    before = sum(p.numel() for p in create("resnet20").parameters())
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    header = checkpoint.save(model, tmp_path / "p.safetensors")
    assert header["edits"] and {e["op"] for e in header["edits"]} == {"resize"}
    loaded = checkpoint.load(tmp_path / "p.safetensors")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_block_replaced_by_identity_and_new_layer_types(tmp_path):
    model = create("resnet20")
    model.layer1[1] = nn.Identity()
    model.layer2[0].conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                          nn.Conv2d(32, 32, 1, bias=False))
    header = checkpoint.save(model, tmp_path / "e.safetensors")
    ops = {e["path"]: e["op"] for e in header["edits"]}
    assert ops == {"layer1.1": "identity", "layer2.0.conv2": "replace"}
    loaded = checkpoint.load(tmp_path / "e.safetensors")
    assert isinstance(loaded.layer1[1], nn.Identity)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_meta_is_kept(tmp_path):
    model = create("resnet20", in_channels=1, input_size=28)
    model.leanconv_meta = {"input_shape": [1, 28, 28], "dataset": {"name": "fashion-mnist"}}
    checkpoint.save(model, tmp_path / "m.safetensors")
    assert checkpoint.load(tmp_path / "m.safetensors").leanconv_meta["dataset"]["name"] == "fashion-mnist"
    assert checkpoint.read_header(tmp_path / "m.safetensors")["meta"]["input_shape"] == [1, 28, 28]


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bomb_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bomb = _Boom()
    bomb.marker = marker
    _Boom.marker = str(marker)
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(pickle.dumps(bomb))
    with pytest.raises(LeanconvError, match="not a leanconv checkpoint"):
        checkpoint.load(path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "torch.pt")
    with pytest.raises(LeanconvError, match="not a leanconv checkpoint"):
        checkpoint.load(tmp_path / "torch.pt")
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    model = create("resnet20")
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LeanconvError):
        checkpoint.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LeanconvError, match="not a leanconv checkpoint"):
        checkpoint.load(tmp_path / "plain.safetensors")
    with pytest.raises(LeanconvError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    model = create("resnet20")
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    good = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        checkpoint.save(create("resnet32"), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def user_net(width=4):
    """A user's model defined outside leanconv."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 2))


def test_user_constructor_is_only_used_when_given(tmp_path):
    target = f"{__name__}:user_net"
    model = from_constructor(target, width=6)
    path = tmp_path / "u.safetensors"
    checkpoint.save(model, path, constructor=target)
    with pytest.raises(LeanconvError, match="user constructor"):
        checkpoint.load(path)
    loaded = checkpoint.load(path, constructor=target)
    torch.testing.assert_close(_logits(loaded), _logits(model))


def test_header_never_names_foreign_layer_types(tmp_path):
    model = create("resnet20")

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w

    model.layer1[0].relu1 = Custom()
    with pytest.raises(LeanconvError, match="not a leanconv layer type"):
        checkpoint.save(model, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def other_net(width=4):
    """A different user model, for the wrong-constructor message."""
    return nn.Sequential(nn.Conv2d(3, width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def failing_net(width=4):
    raise RuntimeError("needs a GPU")


def test_user_model_saves_without_naming_its_constructor_again(tmp_path):
    target = f"{__name__}:user_net"
    model = from_constructor(target, width=6)
    path = tmp_path / "u.safetensors"
    checkpoint.save(model, path)  # the model remembers the function it was built by
    loaded = checkpoint.load(path, constructor=target)
    again = tmp_path / "again.safetensors"
    checkpoint.save(loaded, again)  # and so does a model loaded with it
    torch.testing.assert_close(_logits(checkpoint.load(again, constructor=target)), _logits(model))


def test_wrong_constructor_is_not_called_a_corrupt_file(tmp_path):
    path = tmp_path / "u.safetensors"
    checkpoint.save(from_constructor(f"{__name__}:user_net"), path)
    with pytest.raises(LeanconvError, match=r"does not build the model the file was saved from") as err:
        checkpoint.load(path, constructor=f"{__name__}:other_net")
    assert "corrupt" not in str(err.value)


def test_constructor_failures_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(LeanconvError, match=r"constructor .*failing_net.* failed .*RuntimeError: needs a GPU"):
        from_constructor(f"{__name__}:failing_net")
    (tmp_path / "broken_syntax_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LeanconvError, match=r"cannot import 'broken_syntax_mod'.*SyntaxError"):
        from_constructor("broken_syntax_mod:f")


def _saved_with_edited_header(tmp_path, edit):
    """A ResNet-20 checkpoint with one edit (a new classifier) whose leanconv header is then
    changed in place by ``edit(header)``; the weights stay as written."""
    model = create("resnet20")
    model.fc = nn.Linear(64, 5)  # one edit in the header
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    header = json.loads(head["__metadata__"]["leanconv"])
    edit(header)
    head["__metadata__"]["leanconv"] = json.dumps(header)
    text = json.dumps(head).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return path


def test_negative_channel_count_in_header_is_corrupt(tmp_path):
    path = _saved_with_edited_header(tmp_path, lambda header: header["edits"][0]["module"]["kwargs"].update(
        out_features=-3))
    with pytest.raises(LeanconvError, match="corrupt"):
        checkpoint.load(path)


def test_a_folder_is_not_reported_as_missing(tmp_path):
    with pytest.raises(LeanconvError, match="is a folder"):
        checkpoint.load(tmp_path)


def test_save_and_load_leave_the_random_stream_and_dtype_alone(tmp_path):
    model = create("resnet20", num_classes=4, input_size=16).double()
    path = tmp_path / "m.safetensors"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checkpoint.save(model, path)
    loaded = checkpoint.load(path)
    assert torch.equal(torch.rand(3), expected)  # building the base drew nothing from the caller's stream
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("edits", ["x", [1], [{"op": "resize", "path": "fc", "module": {"type": "Linear", "kwargs": [1, 2]}}]])
def test_malformed_edits_are_corrupt(tmp_path, edits):
    path = _saved_with_edited_header(tmp_path, lambda header: header.update(edits=edits))
    with pytest.raises(LeanconvError, match="corrupt"):
        checkpoint.load(path)


def test_a_header_that_passed_is_not_built_again_and_a_changed_one_still_is(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_PASSED", {})
    builds = []
    real = checkpoint.meta_build
    monkeypatch.setattr(checkpoint, "meta_build", lambda *a, **k: builds.append(1) or real(*a, **k))
    good = tmp_path / "good.safetensors"
    checkpoint.save(create("resnet20"), good)
    first, second = checkpoint.load(good), checkpoint.load(good)
    assert len(builds) == 1  # the second load of the same header skips the meta build
    torch.testing.assert_close(_logits(first), _logits(second), rtol=0, atol=0)
    (tmp_path / "bad").mkdir()
    bad = _saved_with_edited_header(tmp_path / "bad", lambda header: None)  # 5 outputs, 10 classes in its meta
    with pytest.raises(LeanconvError, match="corrupt"):
        checkpoint.load(bad)
    with pytest.raises(LeanconvError, match="corrupt"):
        checkpoint.load(bad)  # a header that failed is built, and refused, again
    assert len(builds) == 3
