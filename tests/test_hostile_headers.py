"""Malformed and hostile checkpoint headers, and input paths that are not regular files: one
line naming the file (exit status 2 on the command line), before anything is allocated.

Every case starts from a genuine checkpoint and changes one field of its header in place
(the weights stay as written), as an attacker or a broken disk would.
"""

import json
import os
import re
import time

import pytest
import torch
from torch import nn

from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.errors import LeanconvError
from leanconv.layers.implant import ImplantConv2d
from leanconv.layers.periodic_sparse import PeriodicSparseConv2d
from leanconv.layers.sliding_channel import SlidingChannelConv2d
from leanconv.layers.spec import layer_types, module_from_spec, module_to_spec
from leanconv.models import create, from_constructor, names

from conftest import edited_resnet

META = {"input_shape": [3, 16, 16], "num_classes": 4, "dataset": {"name": "synthetic", "data_dir": None}}


def _model():
    """ResNet-20 for 3x16x16 with one edit of each leanconv layer kind and a plain one."""
    model = edited_resnet()
    model.leanconv_meta = json.loads(json.dumps(META))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("genuine") / "m.safetensors"
    model = _model()
    checkpoint.save(model, path)
    return path, model


@pytest.fixture
def genuine(saved):
    return saved[0]


def _parts(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    return head, json.loads(head["__metadata__"]["leanconv"]), raw[8 + n:]


def _write(path, head, data, leanconv_text=None, header=None):
    head = dict(head, __metadata__={"leanconv": leanconv_text if leanconv_text is not None else json.dumps(header)})
    text = json.dumps(head).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def _mutated(genuine, tmp_path, change):
    head, header, data = _parts(genuine)
    change(header)
    return _write(tmp_path / "bad.safetensors", head, data, header=header)


def _cli_error(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("leanconv: error:") and "Traceback" not in err, err
    return lines[0]


def _edit(header, path):
    return next(e for e in header["edits"] if e["path"] == path)


MUTATIONS = {
    "meta is a list": (lambda h: h.update(meta=[1, 2]), "meta must be a JSON object"),
    "meta is null": (lambda h: h.update(meta=None), "meta must be a JSON object"),
    "meta.dataset is a text": (lambda h: h["meta"].update(dataset="synthetic"), "meta.dataset must be a JSON object"),
    "meta.dataset.name is a list": (lambda h: h["meta"]["dataset"].update(name=["synthetic"]),
                                    "meta.dataset.name must be a text"),
    "base.zoo is a list": (lambda h: h["base"].update(zoo=["resnet20"]), "base.zoo names no zoo model"),
    "edit type is a list": (lambda h: _edit(h, "fc")["module"].update(type=["Linear"]), "names no leanconv layer type"),
    "Sequential children not a list": (lambda h: _edit(h, "layer2.0.conv2")["module"].update(children=7),
                                       "children must be a list"),
    "children on a Conv2d": (lambda h: _edit(h, "fc")["module"].update(children=[]), "has no children"),
    "input shape of two": (lambda h: h["meta"].update(input_shape=[3, 16]), "meta.input_shape must be three"),
    "input shape with zero": (lambda h: h["meta"].update(input_shape=[3, 0, 16]), "meta.input_shape must be three"),
    "input shape of texts": (lambda h: h["meta"].update(input_shape=["3", "16", "16"]), "meta.input_shape"),
    "input shape huge": (lambda h: h["meta"].update(input_shape=[3, 10**6, 10**6]), "meta.input_shape"),
    "input shape of bools": (lambda h: h["meta"].update(input_shape=[True, 16, 16]), "meta.input_shape"),
    "10**12 classes": (lambda h: h["base"]["kwargs"].update(num_classes=10**12), "base.kwargs.num_classes"),
    "5e7 classes": (lambda h: h["base"]["kwargs"].update(num_classes=50_000_000), "base.kwargs.num_classes"),
    "meta.num_classes huge": (lambda h: h["meta"].update(num_classes=10**12), "meta.num_classes"),
    "huge input side": (lambda h: h["base"]["kwargs"].update(input_size=10**9), "base.kwargs.input_size"),
    "huge in_channels": (lambda h: h["base"]["kwargs"].update(in_channels=10**7), "base.kwargs.in_channels"),
    "channels as a float": (lambda h: _edit(h, "fc")["module"]["kwargs"].update(out_features=4.0), "out_features"),
    "negative channels": (lambda h: _edit(h, "fc")["module"]["kwargs"].update(out_features=-3), "out_features"),
    "unknown layer argument": (lambda h: _edit(h, "fc")["module"]["kwargs"].update(device="cuda"), '"device"'),
    "edit path with a slash": (lambda h: _edit(h, "fc").update(path="../fc"), "path must be a dotted module path"),
    "unknown op": (lambda h: _edit(h, "fc").update(op="exec"), ".op must be one of"),
    "edits not a list": (lambda h: h.update(edits={"fc": 1}), "edits must be a list"),
    "format true": (lambda h: h.update(format=True), "format must be 1"),
    "base with both": (lambda h: h["base"].update(constructor="os:system"), "either a zoo model or a constructor"),
    "zoo argument a dict": (lambda h: h["base"]["kwargs"].update(cfg={"a": 1}), "base.kwargs.cfg"),
    "world_size a text": (lambda h: h["meta"].update(world_size="abc"), "meta.world_size"),
    "epochs_done negative": (lambda h: h["meta"].update(epochs_done=-1), "meta.epochs_done"),
    "conversions a number": (lambda h: h["meta"].update(conversions=5), "meta.conversions"),
    "SCC overlap of 1": (lambda h: _edit(h, "layer2.0.conv2")["module"]["children"][1]["kwargs"].update(overlap=1.0),
                         "overlap"),
    "implant order out of range": (lambda h: _edit(h, "layer3.0.conv2")["module"]["kwargs"].update(
        channel_order=[10**9]), "channel_order"),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_a_malformed_header_field_is_named_in_one_line(genuine, tmp_path, case):
    change, field = MUTATIONS[case]
    path = _mutated(genuine, tmp_path, change)
    with pytest.raises(LeanconvError, match="corrupt or not a leanconv checkpoint") as err:
        checkpoint.load(path)
    assert field in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["meta is a list", "meta.dataset is a text", "base.zoo is a list",
                                  "Sequential children not a list", "input shape of two", "10**12 classes"])
def test_every_command_reads_a_malformed_header_as_one_line(genuine, tmp_path, capsys, case):
    path = _mutated(genuine, tmp_path, MUTATIONS[case][0])
    for argv in (["eval", str(path)], ["profile", str(path), "--no-latency"],
                 ["fold", str(path), "--out", str(tmp_path / "f.safetensors"), "--no-latency"]):
        assert "corrupt or not a leanconv checkpoint" in _cli_error(capsys, *argv)
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_corrupt_not_a_recursion_error(genuine, tmp_path, depth):
    head, header, data = _parts(genuine)
    text = json.dumps(header).replace('"meta": {', '"meta": {"x": ' + "[" * depth + "]" * depth + ", ", 1)
    path = _write(tmp_path / "deep.safetensors", head, data, leanconv_text=text)
    with pytest.raises(LeanconvError, match="corrupt or not a leanconv checkpoint.*nest"):
        checkpoint.load(path)
    outer = b'{"__metadata__": {"leanconv": "{}"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (tmp_path / "outer.safetensors").write_bytes(len(outer).to_bytes(8, "little") + outer)
    with pytest.raises(LeanconvError, match="not a leanconv checkpoint"):
        checkpoint.load(tmp_path / "outer.safetensors")


@pytest.mark.parametrize("change", [
    lambda e: e.update(out_features=100_000),                        # a larger layer than the file holds
    lambda e: e.update(in_features=2**20, out_features=2**20),       # 10**12 elements: never allocated
])
def test_a_layer_larger_than_its_weights_is_refused_before_allocation(genuine, tmp_path, change):
    path = _mutated(genuine, tmp_path, lambda h: change(_edit(h, "fc")["module"]["kwargs"]))
    start = time.perf_counter()
    with pytest.raises(LeanconvError, match="does not fit its own architecture: fc.weight|has over .* elements"):
        checkpoint.load(path)
    assert time.perf_counter() - start < 5


def test_an_edit_that_a_later_edit_replaces_counts_too(genuine, tmp_path):
    huge = {"op": "replace", "path": "fc", "module": {"type": "Linear", "kwargs": {"in_features": 2**20,
                                                                                  "out_features": 2**20}}}
    path = _mutated(genuine, tmp_path, lambda h: h["edits"].insert(0, huge))
    with pytest.raises(LeanconvError, match="corrupt or not a leanconv checkpoint: the model its header describes "
                                            "has over .* tensor elements"):
        checkpoint.load(path)


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(shape=[10**6, 64]), "takes 1024 bytes in the file"),
    (lambda t: t.update(dtype="F128"), "dtype must be one of"),
    (lambda t: t.update(data_offsets=[0, 10**12]), "data_offsets"),
    (lambda t: t.update(shape="4,64"), "shape must be a list"),
])
def test_a_tensor_index_that_claims_more_than_the_file_is_corrupt(genuine, tmp_path, change, match):
    head, header, data = _parts(genuine)
    change(head["fc.weight"])
    path = _write(tmp_path / "index.safetensors", head, data, header=header)
    with pytest.raises(LeanconvError, match=f"corrupt or not a leanconv checkpoint: its tensor index: .*{match}"):
        checkpoint.load(path)


def test_a_huge_synthetic_dataset_in_the_header_is_refused_before_it_is_made(genuine, tmp_path, capsys):
    path = _mutated(genuine, tmp_path, lambda h: h["meta"]["dataset"].update(name="synthetic:n=100000000000"))
    start = time.perf_counter()
    assert "synthetic option n" in _cli_error(capsys, "eval", str(path))
    assert time.perf_counter() - start < 10


def test_a_user_constructor_given_hostile_arguments_is_built_on_meta_first(tmp_path):
    target = f"{__name__}:user_net"
    path = tmp_path / "u.safetensors"
    checkpoint.save(from_constructor(target, width=6), path)
    head, header, data = _parts(path)
    header["base"]["kwargs"]["width"] = 10**9  # 3 * 9 * 10**9 weights if it were built
    _write(path, head, data, header=header)
    with pytest.raises(LeanconvError, match="has over .* tensor elements"):
        checkpoint.load(path, constructor=target)


def user_net(width=4):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 2))


def numpy_net(width=4):
    """A user model whose constructor needs real values (fails on the meta device)."""
    net = user_net(width)
    net[0].weight.data.copy_(torch.from_numpy(net[0].weight.detach().numpy() * 0.5))
    return net


def test_a_user_constructor_that_cannot_build_on_meta_still_loads(tmp_path):
    target = f"{__name__}:numpy_net"
    model = from_constructor(target, width=5)
    path = tmp_path / "n.safetensors"
    checkpoint.save(model, path)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(checkpoint.load(path, constructor=target)(x), model.eval()(x), rtol=0, atol=0)


def test_genuine_checkpoints_of_every_layer_kind_load_exactly(saved):
    path, model = saved
    model.eval()
    loaded = checkpoint.load(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.leanconv_meta == META


@pytest.mark.parametrize("name", names())
def test_every_zoo_model_builds_on_meta_with_its_real_shapes(name):
    from leanconv.checkpoint_header import check_header
    from leanconv.util.meta_build import meta_build

    real = create(name, num_classes=7, in_channels=1, input_size=24)
    meta, elements = meta_build(lambda: create(name, num_classes=7, in_channels=1, input_size=24), max_elements=10**9)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert elements >= sum(v.numel() for v in real.state_dict().values())
    check_header({"format": 1, "base": real.leanconv_base, "edits": [], "meta": real.leanconv_meta})


def test_every_layer_type_passes_the_schema_and_builds_on_meta():
    from leanconv.checkpoint_header import SPEC_ARGS, check_header
    from leanconv.util.meta_build import meta_build

    examples = [nn.Conv2d(4, 8, 3, padding="same", bias=False), nn.Linear(5, 3), nn.BatchNorm2d(4),
                nn.BatchNorm1d(4, momentum=None), nn.Identity(), nn.ReLU(), nn.ReLU6(), nn.Flatten(1),
                nn.Dropout(0.2), nn.AdaptiveAvgPool2d((None, 2)), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 2, 1),
                nn.Sequential(nn.Conv2d(2, 2, 1)), SlidingChannelConv2d(8, 12, 2, 0.25),
                PeriodicSparseConv2d(6, 10, pattern="psd1_p16", bias=True), ImplantConv2d(4, 3, 2, 3, padding=1)]
    assert {module_to_spec(m)["type"] for m in examples} == set(layer_types())
    for module in examples:
        spec = json.loads(json.dumps(module_to_spec(module)))
        assert set(spec["kwargs"]) <= set(SPEC_ARGS)
        check_header({"format": 1, "base": {"zoo": "resnet20"}, "edits": [{"op": "replace", "path": "fc",
                                                                          "module": spec}]})
        meta, _ = meta_build(lambda spec=spec: module_from_spec(spec), max_elements=10**6)
        real = module_from_spec(spec)
        assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


# ---------------------------------------------------------------- input paths (issue 18, item 7)


def test_a_checkpoint_whose_name_is_not_utf8_loads(genuine, tmp_path, capsys):
    odd = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"m\xff\xfe.safetensors"))
    with open(genuine, "rb") as src, open(odd, "wb") as dst:
        dst.write(src.read())
    loaded = checkpoint.load(odd)
    assert loaded.leanconv_meta == META
    assert main(["profile", odd, "--no-latency", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0


@pytest.fixture
def odd_paths(tmp_path):
    fifo, loop, dangling = tmp_path / "pipe.safetensors", tmp_path / "loop.safetensors", tmp_path / "gone.npz"
    os.mkfifo(fifo)
    os.symlink(loop.name, loop)
    os.symlink("nowhere.npz", dangling)
    return {"named pipe": fifo, "symbolic link loop": loop, "missing target": dangling}


def test_a_fifo_or_a_link_loop_is_named_for_what_it_is(odd_paths, capsys):
    for kind, path in odd_paths.items():
        with pytest.raises(LeanconvError, match=kind):
            checkpoint.load(path)
        with pytest.raises(LeanconvError, match=kind):
            checkpoint.read_weights(path)
        assert kind in _cli_error(capsys, "eval", str(path))
        assert kind in _cli_error(capsys, "profile", str(path))


def test_a_data_folder_that_is_a_fifo_or_a_loop_is_named_for_what_it_is(odd_paths, capsys):
    from leanconv.data import load_dataset

    for kind, path in odd_paths.items():
        named = f"{kind}|does not exist" if kind == "missing target" else kind  # a link is followed first
        for spec in (f"imagefolder:{path}", f"npz:{path}"):
            with pytest.raises(LeanconvError, match=named):
                load_dataset(spec)
        with pytest.raises(LeanconvError, match=named):
            load_dataset("fashion-mnist", data_dir=path)
        for argv in (["--data", f"npz:{path}"], ["--data-dir", str(path)]):
            line = _cli_error(capsys, "train", "--model", "resnet20", *argv, "--out", str(path.parent / "o"))
            assert re.search(named, line), line
        assert not (path.parent / "o").exists()
