"""Latency tables: layer configurations found in a model, entries measured only when missing
and cached, a cache file that is bad in any way ignored and rebuilt (never trusted, never
fatal), a named file for another setting refused, and the fitted prediction that equals the
unpruned model's measured latency. Times come from a fake ``measure_layer`` (exact numbers),
except for one real measurement."""

import dataclasses
import json
import math
import os
import re
import threading

import pytest
import torch
from torch import nn

from leanconv.cost import latency_table
from leanconv.cost.hardware import cpu_name, simd_channels
from leanconv.cost.latency_table import (CALL, FORMAT, LatencyModel, LatencyTable, LayerConfig, cache_folder,
                                         cached_table, layer_configs, measure_layer, table_key)
from leanconv.errors import LeanconvError

SHAPE = (3, 8, 8)
FOREIGN_CPU = "Imaginary Vector Engine 9000 (64 logical cores)"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def fake_ms(config: LayerConfig) -> float:
    """A made-up time (ms) that grows with the layer's work and has a per-call cost."""
    if config.kind == "call":
        return 0.01
    return 0.01 + 1e-5 * config.cin * config.kh * config.kw * config.output_elements() / config.groups


@pytest.fixture
def measured(monkeypatch):
    """``measure_layer`` replaced by :func:`fake_ms`; the list of what was measured, and how."""
    calls = []

    def fake(config, runtime, threads, batch):
        calls.append((config, runtime, threads, batch))
        return fake_ms(config)

    monkeypatch.setattr(latency_table, "measure_layer", fake)
    return calls


class Net(nn.Module):
    """conv 3->8 (8x8), grouped strided conv 8->8, dilated depthwise conv (4x4), an asymmetric
    conv the table cannot key, global pool, linear 8->5."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.odd = nn.Conv2d(8, 8, (1, 3), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        x = self.odd(self.dw(x))
        return self.fc(x.mean((2, 3)))


def _chain(widths=(8, 8, 6)) -> nn.Module:
    """conv 3->a->b (3x3), conv b->c (1x1), pool, linear c->2: with step 4, 3->8 and 8->8 are
    blocked, 8->6 and the linear are not."""
    a, b, c = widths
    return nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, b, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(b, c, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2))


CONFIGS = [LayerConfig("conv", 3, 8, 3, 3, 1, 1, 1, 1, 8, 8), LayerConfig("conv", 8, 8, 3, 3, 2, 1, 1, 2, 8, 8),
           LayerConfig("linear", 8, 5), LayerConfig("linear", 8, 5, h=7), CALL]


# --- layer configurations -------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_key_round_trip(config):
    assert LayerConfig.from_key(config.key()) == config
    assert LayerConfig.from_key(config.key()).key() == config.key()


def test_keys_differ_for_every_field():
    base = LayerConfig("conv", 8, 8, 3, 3, 1, 1, 1, 1, 8, 8)
    fields = ["cin", "cout", "kh", "kw", "stride", "padding", "dilation", "groups", "h", "w"]
    changed = [dataclasses.replace(base, **{f: getattr(base, f) + 1}) for f in fields]
    assert len({base.key(), *(c.key() for c in changed)}) == len(fields) + 1


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: f"{c.kind}-h{c.h}")
def test_module_has_the_configuration(config):
    """The layer a configuration builds, run on its input shape, is found as that configuration."""
    module, shape = config.module()
    assert layer_configs(module, shape) == {"": config}


def test_layer_configs_finds_convs_and_linears():
    model = Net().train()
    found = layer_configs(model, SHAPE)
    assert found == {
        "conv1": LayerConfig("conv", 3, 8, 3, 3, 1, 1, 1, 1, 8, 8),
        "conv2": LayerConfig("conv", 8, 8, 3, 3, 2, 1, 1, 2, 8, 8),
        "dw": LayerConfig("conv", 8, 8, 3, 3, 1, 2, 2, 8, 4, 4),
        "fc": LayerConfig("linear", 8, 5),
    }  # "odd" (stride (1, 2)) is not a configuration the table keys
    assert model.training and model.bn.training  # mode put back
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert torch.equal(model.bn.running_mean, torch.zeros(8))  # ran in eval mode: statistics untouched


def test_layer_configs_linear_rows_and_first_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x):  # x: [batch, 5 rows, 6]
            return self.proj(self.proj(x)[:, :2])

    assert layer_configs(Twice(), (5, 6)) == {"proj": LayerConfig("linear", 6, 6, h=5)}  # first call's rows


def test_output_elements():
    assert LayerConfig("conv", 3, 8, 3, 3, 2, 1, 1, 1, 8, 8).output_elements() == 8 * 4 * 4
    assert LayerConfig("conv", 8, 8, 3, 3, 1, 2, 2, 8, 4, 4).output_elements() == 8 * 4 * 4
    assert LayerConfig("conv", 8, 4, 3, 3, 1, 0, 1, 1, 8, 8).output_elements() == 4 * 6 * 6
    assert LayerConfig("linear", 8, 5, h=7).output_elements() == 35


@pytest.mark.parametrize("config,step,blocked", [
    (LayerConfig("conv", 16, 16, 3, 3), 16, True),
    (LayerConfig("conv", 32, 16, 3, 3), 16, True),
    (LayerConfig("conv", 3, 16, 3, 3), 16, True),  # reads the image: converts its output only
    (LayerConfig("conv", 1, 8, 3, 3), 8, True),
    (LayerConfig("conv", 4, 16, 3, 3), 16, False),  # 4 channels is not an image any more
    (LayerConfig("conv", 16, 12, 3, 3), 16, False),
    (LayerConfig("conv", 12, 16, 3, 3), 16, False),
    (LayerConfig("conv", 12, 16, 3, 3), 4, True),
    (LayerConfig("linear", 16, 16), 16, False),
    (CALL, 1, False),
])
def test_blocked_rule(config, step, blocked):
    assert config.blocked(step) is blocked


# --- the table and its cache ----------------------------------------------------------------

def test_table_key_names_the_setting():
    key = table_key("torch", 2, 3)
    assert key["version"] == latency_table.runtime_version("torch")
    assert (key["format"], key["runtime"], key["threads"], key["batch"], key["cpu"]) == \
        (FORMAT, "torch", 2, 3, cpu_name())
    with pytest.raises(LeanconvError, match="unknown runtime"):
        table_key("nope", 1, 1)
    with pytest.raises(LeanconvError, match="threads"):
        table_key("torch", 0, 1)


def test_cached_table_lives_in_the_cache_folder(tmp_path):
    assert cache_folder() == tmp_path / "cache" / "leanconv" / "latency"
    table = cached_table("torch", 1, 1)
    assert table.entries == {} and table.here and table.runtime == "torch"
    assert table.key == table_key("torch", 1, 1)
    assert table.path.parent == cache_folder() and not table.path.exists()
    others = {cached_table(*setting).path for setting in [("torch", 2, 1), ("torch", 1, 2), ("onnxruntime", 1, 1)]}
    assert table.path not in others and len(others) == 3


def test_ensure_measures_only_what_is_missing(measured):
    table = cached_table("torch", 2, 3)
    progress = []
    assert table.ensure(CONFIGS[:2], lambda i, n: progress.append((i, n))) == 2
    assert progress == [(1, 2), (2, 2)]
    assert sorted(c for c, *_ in measured) == sorted(CONFIGS[:2])
    assert {tuple(setting) for _, *setting in measured} == {("torch", 2, 3)}
    assert table.path.is_file()  # saved into the cache
    assert table.ensure([*CONFIGS[:3], CONFIGS[0]]) == 1  # only the linear is new; a repeat counts once
    assert [c for c, *_ in measured][2:] == [CONFIGS[2]]
    assert table.ensure(CONFIGS[:3]) == 0 and len(measured) == 3
    assert table.time_of(CONFIGS[2]) == fake_ms(CONFIGS[2])
    assert table.missing(CONFIGS) == sorted(CONFIGS[3:])
    assert table.predict_layers({"a": CONFIGS[0], "b": CONFIGS[1]}) == pytest.approx(
        fake_ms(CONFIGS[0]) + fake_ms(CONFIGS[1]))


def test_cached_table_reloads_what_was_saved(measured):
    table = cached_table("torch", 1, 1)
    table.ensure(CONFIGS)
    again = cached_table("torch", 1, 1)
    assert again.path == table.path and again.key == table.key
    assert again.entries == table.entries and len(again.entries) == len(CONFIGS)
    assert again.ensure(CONFIGS) == 0 and len(measured) == len(CONFIGS)
    assert cached_table("torch", 2, 1).entries == {}  # another thread count: another table


def test_ensure_of_nothing_writes_nothing(measured):
    table = cached_table("torch", 1, 1)
    assert table.ensure([]) == 0
    assert not table.path.exists() and measured == []


def test_measure_layer_really_measures():
    config = LayerConfig("conv", 3, 4, 3, 3, 1, 1, 1, 1, 8, 8)
    for c in (config, CALL):
        ms = measure_layer(c, "torch", 1, 2)
        assert isinstance(ms, float) and 0 < ms < math.inf
    assert torch.get_num_threads() == 1


def _valid(**changes) -> dict:
    data = {**table_key("torch", 1, 1), "entries": {CONFIGS[0].key(): 0.5, CALL.key(): 0.01}}
    data.update(changes)
    return data


def _entries(entries: dict) -> dict:
    return _valid(entries=entries)


CORRUPT = {
    "not json": b"{not json",
    "empty": b"",
    "not utf-8": b"\xff\xfe\x00{",
    "a list": b"[]",
    "deep nesting": b"[" * 200_000,
    "other format": _valid(format="leanconv-latency-table/0"),
    "no entries": {k: v for k, v in _valid().items() if k != "entries"},
    "entries a list": _valid(entries=[]),
    "no cpu": {k: v for k, v in _valid().items() if k != "cpu"},
    "other cpu": _valid(cpu=FOREIGN_CPU),
    "other version": _valid(version="0.0.1"),
    "threads as text": _valid(threads="1"),
    "negative time": _entries({CONFIGS[0].key(): -1.0}),
    "zero time": _entries({CONFIGS[0].key(): 0}),
    "nan time": _entries({CONFIGS[0].key(): float("nan")}),
    "infinite time": _entries({CONFIGS[0].key(): float("inf")}),
    "huge integer time": _entries({CONFIGS[0].key(): 10**400}),  # a JSON integer too large for a float
    "bool time": _entries({CONFIGS[0].key(): True}),
    "text time": _entries({CONFIGS[0].key(): "0.5"}),
    "bad key": _entries({"conv 3x3": 0.5}),
    "key without kind": _entries({CONFIGS[0].key().split(",", 1)[1]: 0.5}),
    "key missing a field": _entries({"kind=conv,cin=1": 0.5}),
    "key with a foreign field": _entries({CONFIGS[0].key() + ",bias=1": 0.5}),
    "key out of order": _entries({",".join(reversed(CONFIGS[0].key().split(","))): 0.5}),
    "key with text number": _entries({CONFIGS[0].key().replace("cin=3", "cin=three"): 0.5}),
}


def _write(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))


def _assert_rebuilt(path, measured) -> None:
    table = cached_table("torch", 1, 1)
    assert table.entries == {} and table.path == path and table.here
    assert table.ensure(CONFIGS[:2]) == 2
    again = cached_table("torch", 1, 1)
    assert set(again.entries) == {c.key() for c in CONFIGS[:2]}
    assert len(measured) == 2


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_cache_is_ignored_and_rebuilt(name, measured):
    path = cached_table("torch", 1, 1).path
    _write(path, CORRUPT[name])
    _assert_rebuilt(path, measured)


@pytest.mark.parametrize("name", [n for n in CORRUPT if n != "other cpu"])  # strict: only the CPU may differ
def test_corrupt_named_file_is_one_line_error(tmp_path, name):
    path = tmp_path / "table.json"
    _write(path, CORRUPT[name])
    with pytest.raises(LeanconvError, match=f"cannot use latency table {path}") as err:
        LatencyTable.load(path, table_key("torch", 1, 1), strict=True)
    assert "\n" not in str(err.value)


def test_valid_file_passes_the_same_checks(tmp_path):
    """The corruptions above are each one change from this file, which loads."""
    path = tmp_path / "table.json"
    _write(path, _valid())
    table = LatencyTable.load(path, table_key("torch", 1, 1), strict=True)
    assert table.entries == {CONFIGS[0].key(): 0.5, CALL.key(): 0.01}
    assert table.path is None and table.here  # a named file is read as is, never written


def _run_with_timeout(fn, seconds: float = 20.0):
    """``fn()`` in a thread; fails the test (instead of hanging it) when it blocks."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked (opened a FIFO?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_fifo_in_the_cache_is_not_opened(measured, caplog):
    path = cached_table("torch", 1, 1).path
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    table = _run_with_timeout(lambda: cached_table("torch", 1, 1))
    assert table.entries == {}
    assert table.ensure(CONFIGS[:2]) == 2  # measured and kept in memory; the FIFO is not replaced
    assert path.is_fifo() and "not saved" in caplog.text
    assert table.time_of(CONFIGS[0]) == fake_ms(CONFIGS[0])
    with pytest.raises(LeanconvError, match="not a regular file"):
        _run_with_timeout(lambda: LatencyTable.load(path, table_key("torch", 1, 1), strict=True))


def test_unwritable_cache_does_not_fail_a_measurement(measured, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    table = cached_table("torch", 1, 1)
    assert table.entries == {}
    assert table.ensure(CONFIGS[:2]) == 2 and len(table.entries) == 2


def test_file_over_the_size_limit_is_ignored(measured, monkeypatch):
    path = cached_table("torch", 1, 1).path
    _write(path, _valid())
    size = path.stat().st_size
    monkeypatch.setattr(latency_table, "MAX_TABLE_BYTES", size)
    assert len(cached_table("torch", 1, 1).entries) == 2  # at the limit: read
    monkeypatch.setattr(latency_table, "MAX_TABLE_BYTES", size - 1)
    assert cached_table("torch", 1, 1).entries == {}  # one byte over: ignored
    with pytest.raises(LeanconvError, match="larger than"):
        LatencyTable.load(path, table_key("torch", 1, 1), strict=True)
    table = cached_table("torch", 1, 1)
    monkeypatch.setattr(latency_table, "MAX_TABLE_BYTES", 64 * 2**20)
    assert table.ensure(CONFIGS[:2]) == 2  # rebuilt over the big file
    assert set(cached_table("torch", 1, 1).entries) == {c.key() for c in CONFIGS[:2]}


# --- a table the user names -----------------------------------------------------------------

def test_save_and_strict_load_round_trip(tmp_path, measured):
    table = LatencyTable(table_key("torch", 1, 2))
    table.ensure(CONFIGS)
    assert table.path is None
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json", table_key("torch", 1, 2), strict=True)
    assert loaded.entries == table.entries and loaded.key == table.key


@pytest.mark.parametrize("saved,field", [
    (("onnxruntime", 1, 1), "runtime"),
    (("torch", 2, 1), "threads"),
    (("torch", 1, 4), "batch"),
])
def test_strict_load_refuses_another_setting(tmp_path, saved, field):
    LatencyTable(table_key(*saved), {CALL.key(): 0.01}).save(tmp_path / "t.json")
    wanted = table_key("torch", 1, 1)
    with pytest.raises(LeanconvError, match="cannot use latency table") as err:
        LatencyTable.load(tmp_path / "t.json", wanted, strict=True)
    message = str(err.value)
    assert "\n" not in message
    differs = message.split("it was made for ", 1)[1].split(";", 1)[0]
    saved_key = table_key(*saved)
    assert f"{field} {saved_key[field]!r} (not {wanted[field]!r})" in differs
    for other in ("runtime", "threads", "batch", "cpu", "format"):
        if other != field:
            assert not re.search(rf"(^|, ){other} ", differs), other
    # the cache is never refused: it is rebuilt
    assert LatencyTable.load(tmp_path / "t.json", wanted, strict=False).entries == {}


def test_strict_load_of_missing_file(tmp_path):
    with pytest.raises(LeanconvError, match="does not exist; build one with leanconv latency-table"):
        LatencyTable.load(tmp_path / "none.json", table_key("torch", 1, 1), strict=True)


def test_table_from_another_cpu(tmp_path, measured):
    key = {**table_key("torch", 1, 1), "cpu": FOREIGN_CPU}
    LatencyTable(key, {CALL.key(): 0.02, CONFIGS[0].key(): 0.5}).save(tmp_path / "t.json")
    table = LatencyTable.load(tmp_path / "t.json", table_key("torch", 1, 1), strict=True)
    assert table.key["cpu"] == FOREIGN_CPU and not table.here and table.path is None
    assert table.time_of(CONFIGS[0]) == 0.5
    assert table.ensure([CALL, CONFIGS[0]]) == 0  # nothing missing: fine
    with pytest.raises(LeanconvError, match="lacks 1 layer configuration") as err:
        table.ensure([CALL, CONFIGS[0], CONFIGS[1]])
    assert FOREIGN_CPU in str(err.value) and "\n" not in str(err.value)
    assert measured == [] and CONFIGS[1].key() not in table.entries
    assert LatencyTable.load(tmp_path / "t.json", table_key("torch", 1, 1), strict=False).entries == {}


# --- the latency model ----------------------------------------------------------------------

def _sums(model: nn.Module, step: int) -> tuple[float, float]:
    """The fake table's net time (less the call cost) of the blocked and of the other layers."""
    configs = layer_configs(model, SHAPE).values()
    net = [(fake_ms(c) - fake_ms(CALL), c.blocked(step)) for c in configs]
    return sum(t for t, b in net if b), sum(t for t, b in net if not b)


def test_calibrate_predicts_the_measured_latency(measured):
    model = _chain()
    blocked, other = _sums(model, 4)
    assert blocked > 0 and other > 0  # both kinds present
    measured_ms = fake_ms(CALL) + 1.5 * blocked + other
    table = cached_table("onnxruntime", 1, 1)
    fitted = LatencyModel.calibrate(table, model, SHAPE, measured_ms, step=4)
    assert {c for c, *_ in measured} == {CALL, *layer_configs(model, SHAPE).values()}
    assert fitted.scale == pytest.approx(1.5, rel=1e-9)
    assert (fitted.step, fitted.input_shape, fitted.reference_ms) == (4, SHAPE, measured_ms)
    assert fitted.call_ms == fake_ms(CALL)
    assert fitted.predict(model) == pytest.approx(measured_ms, rel=1e-9)
    assert cached_table("onnxruntime", 1, 1).entries == table.entries  # calibration's measurements were cached
    for config in layer_configs(model, SHAPE).values():
        net = fake_ms(config) - fake_ms(CALL)
        assert fitted.layer_ms(config) == pytest.approx(net * (1.5 if config.blocked(4) else 1.0), rel=1e-12)


def test_fewer_channels_predict_lower(measured):
    model = _chain()
    blocked, other = _sums(model, 4)
    fitted = LatencyModel.calibrate(cached_table("onnxruntime", 1, 1), model, SHAPE, fake_ms(CALL) + 1.2 * blocked + other,
                                    step=4)
    full = fitted.predict(model)
    before = len(measured)
    for widths in [(4, 8, 6), (8, 4, 6), (4, 4, 4), (8, 6, 6), (8, 8, 2)]:  # blocked and not, every layer
        smaller = fitted.predict(_chain(widths))
        assert 0 < smaller < full, widths
    assert len(measured) > before  # the new configurations were measured on demand
    assert fitted.predict(_chain((2, 2, 2))) < fitted.predict(_chain((4, 4, 4)))


@pytest.mark.parametrize("factor,scale", [(1e3, 20.0), (1e-3, 0.05)])
def test_calibrate_clamps_the_scale(measured, factor, scale):
    model = _chain()
    blocked, other = _sums(model, 4)
    fitted = LatencyModel.calibrate(cached_table("onnxruntime", 1, 1), model, SHAPE,
                                    (fake_ms(CALL) + blocked + other) * factor, step=4)
    assert fitted.scale == scale


def test_calibrate_without_blocked_layers_keeps_scale_one(measured):
    model = _chain((6, 6, 6))  # the first conv reads the image (3 channels) but gives 6: nothing blocked at step 4
    fitted = LatencyModel.calibrate(cached_table("onnxruntime", 1, 1), model, SHAPE, 123.0, step=4)
    assert fitted.scale == 1.0


def test_calibrate_default_step_is_the_cpu_block(measured):
    fitted = LatencyModel.calibrate(cached_table("onnxruntime", 1, 1), _chain(), SHAPE, 1.0)
    assert fitted.step == simd_channels()


def test_calibrate_refuses_a_model_without_layers(measured):
    with pytest.raises(LeanconvError, match="no conv or linear layer"):
        LatencyModel.calibrate(cached_table("onnxruntime", 1, 1), nn.ReLU(), SHAPE, 1.0)
    assert measured == []


def test_layer_faster_than_a_call_counts_zero():
    table = LatencyTable(table_key("onnxruntime", 1, 1), {CALL.key(): 0.05, CONFIGS[2].key(): 0.03})
    model = LatencyModel(table, (8,), 1.0, 2.0, 4)
    assert model.layer_ms(CONFIGS[2]) == 0.0
    assert model.predict(nn.Linear(8, 5)) == 0.05  # call cost once, the layer's net time clamped at zero


def test_eager_pytorch_predicts_each_layer_as_timed_plus_a_fixed_offset(measured):
    """Eager PyTorch calls every layer on its own: no call cost is taken off, no blocked factor,
    and what the table does not hold is one offset fitted on the unpruned model."""
    model = _chain()
    layers = sum(fake_ms(c) for c in layer_configs(model, SHAPE).values())
    fitted = LatencyModel.calibrate(cached_table("torch", 1, 1), model, SHAPE, layers + 0.25, step=4)
    assert fitted.eager and fitted.scale == 1.0 and fitted.offset == pytest.approx(0.25)
    assert fitted.predict(model) == pytest.approx(layers + 0.25, rel=1e-12)
    smaller = _chain((4, 4, 4))
    expected = 0.25 + sum(fake_ms(c) for c in layer_configs(smaller, SHAPE).values())
    assert fitted.predict(smaller) == pytest.approx(expected, rel=1e-12)
    fitted.refit(model, layers + 0.5)  # a steadier measurement of the unpruned model moves the offset only
    assert fitted.offset == pytest.approx(0.5) and fitted.reference_ms == layers + 0.5


def _eager_truth(model: nn.Module, offset: float, per_value: float, batch: int) -> float:
    """What a runtime whose graph costs ``offset`` plus ``per_value`` per value each layer writes
    would measure for ``model`` (its layers as the fake table times them)."""
    configs = layer_configs(model, SHAPE).values()
    return offset + sum(fake_ms(c) + per_value * c.output_elements() * batch for c in configs)


@pytest.mark.parametrize("batch", [1, 4])
def test_eager_pytorch_with_a_thin_reference_fits_the_work_per_value(measured, batch):
    """Two references (the unpruned model and a narrower copy, its latency a ratio measured
    side by side) fit offset and per-value cost exactly, so a third width is predicted exactly;
    the offset alone (one reference) is off for it. A refit keeps the thin reference's ratio."""
    model, thin, other = _chain(), _chain((4, 4, 4)), _chain((8, 4, 6))
    truth = {m: _eager_truth(m, 0.3, 1e-4, batch) for m in (model, thin, other)}
    table = cached_table("torch", 1, batch)
    fitted = LatencyModel.calibrate(table, model, SHAPE, truth[model], step=4,
                                    thin=(layer_configs(thin, SHAPE), truth[thin] / truth[model]))
    assert fitted.offset == pytest.approx(0.3, rel=1e-9) and fitted.element_ms == pytest.approx(1e-4, rel=1e-9)
    for m in (model, thin, other):
        assert fitted.predict(m) == pytest.approx(truth[m], rel=1e-9)
    alone = LatencyModel.calibrate(table, model, SHAPE, truth[model], step=4)
    assert alone.element_ms == 0.0 and abs(alone.predict(other) / truth[other] - 1) > 1e-3
    fitted.refit(model, 1.2 * truth[model])  # a new measurement of the unpruned model: the thin ratio holds
    assert fitted.reference_ms == 1.2 * truth[model] and fitted.element_ms > 1e-4
    assert fitted.predict(model) == pytest.approx(1.2 * truth[model], rel=1e-9)
    assert fitted.predict(thin) == pytest.approx(1.2 * truth[thin], rel=1e-9)


def test_a_thin_reference_that_implies_negative_work_keeps_the_offset_alone(measured):
    model, thin = _chain(), _chain((4, 4, 4))
    layers = sum(fake_ms(c) for c in layer_configs(model, SHAPE).values())
    # the thin copy measured as slow as the unpruned model: more values would cost less
    fitted = LatencyModel.calibrate(cached_table("torch", 1, 1), model, SHAPE, layers + 0.25, step=4,
                                    thin=(layer_configs(thin, SHAPE), 1.0))
    assert fitted.element_ms == 0.0 and fitted.offset == pytest.approx(0.25)


def test_graph_runtimes_ignore_a_thin_reference(measured):
    model = _chain()
    blocked, other = _sums(model, 4)
    measured_ms = fake_ms(CALL) + 1.5 * blocked + other
    table = cached_table("onnxruntime", 1, 1)
    fitted = LatencyModel.calibrate(table, model, SHAPE, measured_ms, step=4,
                                    thin=(layer_configs(_chain((4, 4, 4)), SHAPE), 0.5))
    assert fitted.scale == pytest.approx(1.5) and fitted.element_ms == 0.0


def test_entries_of_an_earlier_run_follow_the_machine_speed_measured_now(measured, monkeypatch):
    """A cache measured when the machine was twice as slow: calibration measures the unpruned
    model's layers again, and every older entry is read on today's scale (and saved so)."""
    model = _chain()
    small = _chain((4, 4, 4))
    slower = {c.key(): 2 * fake_ms(c) for c in [CALL, *layer_configs(model, SHAPE).values(),
                                                 *layer_configs(small, SHAPE).values()]}
    table = cached_table("onnxruntime", 1, 1)
    LatencyTable(table.key, slower).save(table.path)
    old = cached_table("onnxruntime", 1, 1)
    blocked, other = _sums(model, 4)
    fitted = LatencyModel.calibrate(old, model, SHAPE, fake_ms(CALL) + 1.5 * blocked + other, step=4)
    assert old.drift == pytest.approx(0.5)  # the unpruned model's layers, measured again, took half the time
    assert {c for c, *_ in measured} == {CALL, *layer_configs(model, SHAPE).values()}  # only those
    fresh = LatencyModel.calibrate(cached_table("onnxruntime", 1, 2), model, SHAPE,
                                   fake_ms(CALL) + 1.5 * blocked + other, step=4)
    fresh.table.ensure(layer_configs(small, SHAPE).values())
    assert fitted.predict(small) == pytest.approx(fresh.predict(small), rel=1e-12)  # as if measured today
    old.save(table.path)
    saved = LatencyTable.load(table.path, table.key, strict=False)
    assert all(saved.entries[k] == pytest.approx(v / 2) for k, v in slower.items())
