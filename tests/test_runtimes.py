"""Runtimes (torch, onnxruntime, openvino) and side-by-side timing: a prepared call computes
the model's function, the caller's model and thread count are left alone, bad settings are
one-line errors, and interleaved timing has the structure it promises (never a speed)."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from torch import nn

from leanconv.cost import side_by_side
from leanconv.cost.hardware import cpu_name
from leanconv.cost.runtimes import (RUNTIMES, STEADY_ALLOCATOR, STEADY_ALLOCATOR_ENV, _batch, check_runtime,
                                    check_threads_batch, prepare, runtime_version, steady_allocator, torch_threads)
from leanconv.cost.side_by_side import SideBySide, time_prepared, time_side_by_side
from leanconv.errors import LeanconvError
from leanconv.util import timing
from leanconv.util.limits import MAX_BATCH, MAX_THREADS

SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _need(runtime: str) -> None:
    if runtime == "openvino":
        pytest.importorskip("openvino")


def _net(bn: bool = False) -> nn.Module:
    """A tiny conv net for 3x8x8: conv (+ BatchNorm with non-trivial statistics), a strided
    conv, a linear head."""
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if bn:
        norm = nn.BatchNorm2d(4)
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(-1.5, 1.5)
            norm.bias.uniform_(-1, 1)
        layers.append(norm)
    layers += [nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def _output(value) -> torch.Tensor:
    """The first output of a prepared call: a tensor (torch), a list (onnxruntime) or an OVDict."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().contiguous()
    return torch.from_numpy(np.array(value[0], dtype=np.float32))


def _reference(model: nn.Module, shape=SHAPE, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_batch(shape, batch))


# --- prepare: the call computes the model -----------------------------------------------------

@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_prepared_call_matches_pytorch(runtime, bn):
    _need(runtime)
    model = _net(bn).train()  # prepare must run it in eval mode (train-mode BN would use batch statistics)
    prepared = prepare(model, SHAPE, runtime=runtime, batch=2)
    assert (prepared.runtime, prepared.threads, prepared.batch) == (runtime, 1, 2)
    assert prepared.layout == ("channels_last" if runtime == "torch" else "contiguous")
    out = _output(prepared.call())
    assert model.training  # its mode was put back
    torch.testing.assert_close(out, _reference(model), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(_output(prepared.call()), out, rtol=1e-3, atol=1e-4)  # same batch every call


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_prepare_runs_a_linear_model_on_flat_input(runtime):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    prepared = prepare(model, (6,), runtime=runtime, batch=2)
    assert prepared.layout == "contiguous"
    torch.testing.assert_close(_output(prepared.call()), _reference(model, (6,)), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_prepare_leaves_model_and_threads_alone(runtime):
    _need(runtime)
    model = _net(bn=True).train()
    model[1].eval()  # a mixed-mode model: each module's own flag must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.set_num_threads(2)
    prepare(model, SHAPE, runtime=runtime, threads=1, batch=2)
    assert torch.get_num_threads() == 2
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert next(model.parameters()).is_contiguous()  # not turned channels_last in place


def test_torch_threads_restores_on_error():
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_model_the_runtime_cannot_run_is_one_line(runtime):
    torch.set_num_threads(2)
    model = nn.Linear(8, 2)
    with pytest.raises(LeanconvError, match=f"^{runtime} cannot run this model") as err:
        prepare(model, (3,), runtime=runtime)
    assert "\n" not in str(err.value)
    assert torch.get_num_threads() == 2  # restored on failure too
    assert model.training


# --- runtime and setting checks -----------------------------------------------------------

def test_unknown_runtime_names_the_choices():
    with pytest.raises(LeanconvError, match="unknown runtime 'nope'") as err:
        check_runtime("nope")
    assert all(name in str(err.value) for name in RUNTIMES)
    with pytest.raises(LeanconvError, match="unknown runtime"):
        prepare(_net(), SHAPE, runtime="nope")


@pytest.mark.parametrize("missing", RUNTIMES)
def test_missing_runtime_package_gives_install_hint(monkeypatch, missing):
    real = importlib.metadata.version

    def version(name):
        if name == missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(LeanconvError, match=f"runtime {missing} is not installed; install it with: pip install") as err:
        check_runtime(missing)
    assert missing in str(err.value).split("install it with:")[1]
    with pytest.raises(LeanconvError, match="not installed"):
        prepare(_net(), SHAPE, runtime=missing)  # refused before any import or export
    others = [r for r in RUNTIMES if r != missing]
    assert check_runtime(others[0]) == others[0]


def test_runtime_version_is_the_installed_package():
    assert runtime_version("torch").split(" (")[0] == importlib.metadata.version("torch")
    assert runtime_version("onnxruntime") == importlib.metadata.version("onnxruntime")


def test_torch_timings_keep_freed_memory_and_say_so():
    """On glibc (every CI machine) the torch runtime times with freed memory kept, and its
    version (in every table key and record) says so; a table made without it is foreign."""
    if steady_allocator() is None:
        pytest.skip("the C library is not glibc")
    assert steady_allocator() == STEADY_ALLOCATOR  # idempotent
    assert runtime_version("torch") == f"{importlib.metadata.version('torch')} ({STEADY_ALLOCATOR})"
    assert STEADY_ALLOCATOR not in runtime_version("onnxruntime")
    import ctypes
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(-3, 32 * 2**20) == 1  # the values steady_allocator sets are ones glibc accepts
    assert "MALLOC_MMAP_THRESHOLD_=33554432" in STEADY_ALLOCATOR_ENV


def test_no_glibc_leaves_the_allocator_alone(monkeypatch):
    import ctypes

    class NoMallopt:
        def __init__(self, name):
            raise OSError("no C library")

    steady_allocator.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    try:
        assert steady_allocator() is None
        assert runtime_version("torch") == importlib.metadata.version("torch")
    finally:
        steady_allocator.cache_clear()
        monkeypatch.undo()
        steady_allocator()


@pytest.mark.parametrize("threads,batch,label", [
    (0, 1, "threads"), (1, 0, "batch"), (-1, 1, "threads"), (True, 1, "threads"), (1, True, "batch"),
    (1.0, 1, "threads"), (1, 2.0, "batch"), ("1", 1, "threads"), (None, 1, "threads"),
    (MAX_THREADS + 1, 1, "threads"), (1, MAX_BATCH + 1, "batch"),
])
def test_check_threads_batch_refuses(threads, batch, label):
    with pytest.raises(LeanconvError, match=f"^{label} must be a whole number from 1 to"):
        check_threads_batch(threads, batch)


def test_check_threads_batch_accepts_the_range_ends():
    check_threads_batch(1, 1)
    check_threads_batch(MAX_THREADS, MAX_BATCH)


def test_prepare_refuses_bad_threads_batch_and_shape():
    with pytest.raises(LeanconvError, match="threads"):
        prepare(_net(), SHAPE, runtime="torch", threads=0)
    with pytest.raises(LeanconvError, match="batch"):
        prepare(_net(), SHAPE, runtime="torch", batch=False)
    with pytest.raises(LeanconvError, match="input shape"):
        prepare(_net(), (3, 0, 8), runtime="torch")


def test_batch_is_deterministic():
    assert torch.equal(_batch(SHAPE, 2), _batch(SHAPE, 2))
    assert _batch(SHAPE, 2).shape == (2, *SHAPE)


# --- side by side ---------------------------------------------------------------------------

def _narrow() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_side_by_side_structure():
    models = {"narrow": _narrow(), "wide": _net(bn=True)}
    result = time_side_by_side(models, SHAPE, reference="wide", runtime="torch", threads=1, batch=2, rounds=3,
                               repeats=2, warmup=1)
    assert isinstance(result, SideBySide)
    assert (result.reference, result.runtime, result.threads, result.batch, result.rounds, result.repeats) == \
        ("wide", "torch", 1, 2, 3, 2)
    assert result.version == runtime_version("torch") and result.cpu == cpu_name()
    assert set(result.latency_ms) == set(result.ratio) == set(result.speedup) == set(models)
    assert result.ratio["wide"] == {"median": 1.0, "low": 1.0, "high": 1.0}
    assert result.speedup["wide"] == {"median": 1.0, "low": 1.0, "high": 1.0}
    for name in models:
        lat, ratio, speedup = result.latency_ms[name], result.ratio[name], result.speedup[name]
        assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"] < np.inf
        for spread in (ratio, speedup):
            assert 0 < spread["low"] <= spread["median"] <= spread["high"] < np.inf
        # per round, speedup = 1 / ratio: the median round is the same round, the extremes swap
        assert ratio["median"] * speedup["median"] == pytest.approx(1.0, rel=1e-9)
        assert ratio["low"] * speedup["high"] == pytest.approx(1.0, rel=1e-9)
        assert ratio["high"] * speedup["low"] == pytest.approx(1.0, rel=1e-9)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    line = result.setting()
    assert "\n" not in line
    for part in (f"torch {result.version}", "1 thread", "batch 2", cpu_name(), "3 interleaved rounds of 2"):
        assert part in line, part


def test_side_by_side_default_reference_is_the_first_model():
    result = time_side_by_side({"a": _narrow(), "b": _net()}, SHAPE, runtime="torch", rounds=1, repeats=1, warmup=0)
    assert result.reference == "a" and result.ratio["a"]["median"] == 1.0


def test_side_by_side_shape_per_model():
    low = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))  # runs at 4x4 only
    full = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    result = time_side_by_side({"full": full, "low": low}, {"full": SHAPE, "low": (3, 4, 4)}, runtime="torch",
                               rounds=2, repeats=1, warmup=0)
    assert set(result.latency_ms) == {"full", "low"} and result.reference == "full"
    with pytest.raises(LeanconvError, match="torch cannot run this model"):  # one shape for both: low cannot run
        time_side_by_side({"full": full, "low": low}, SHAPE, runtime="torch", rounds=1, repeats=1, warmup=0)
    with pytest.raises(LeanconvError, match="input shape for every model"):
        time_side_by_side({"full": full, "low": low}, {"full": SHAPE}, runtime="torch")
    with pytest.raises(LeanconvError, match="input shape for every model"):
        time_side_by_side({"full": full}, {"full": SHAPE, "other": SHAPE}, runtime="torch")


@pytest.mark.parametrize("kwargs,match", [
    ({"reference": "nope"}, r"reference 'nope' is not one of the models timed \(a, b\)"),
    ({"rounds": 0}, "rounds must be a whole number of at least 1"),
    ({"rounds": True}, "rounds must be"),
    ({"repeats": 0}, "repeats must be"),
    ({"repeats": 1.5}, "repeats must be"),
    ({"warmup": -1}, "warmup must be"),
    ({"runtime": "nope"}, "unknown runtime"),
    ({"threads": 0}, "threads must be"),
])
def test_side_by_side_refuses_bad_settings_before_preparing(monkeypatch, kwargs, match):
    def no_prepare(*args, **kw):
        raise AssertionError("prepared a model before checking the settings")

    if "runtime" not in kwargs and "threads" not in kwargs:  # those two are checked by prepare itself
        monkeypatch.setattr(side_by_side, "prepare", no_prepare)
    with pytest.raises(LeanconvError, match=match):
        time_side_by_side({"a": _net(), "b": _narrow()}, SHAPE, **kwargs)


def test_side_by_side_needs_a_model():
    with pytest.raises(LeanconvError, match="nothing to time"):
        time_side_by_side({}, SHAPE, runtime="torch")


def test_time_prepared_interleaves_rotating_order():
    log = []

    def fake(name):
        def call():
            log.append((name, torch.get_num_threads()))
        return call

    names = ["a", "b", "c"]
    rounds, repeats, warmup = 4, 3, 2
    times = time_prepared({n: fake(n) for n in names}, threads=2, rounds=rounds, repeats=repeats, warmup=warmup)
    assert torch.get_num_threads() == 1  # conftest's count, restored
    assert {threads for _, threads in log} == {2}
    order = [n for n, _ in log]
    expected = [n for n in names for _ in range(warmup + 1)]  # warm-up: each model alone, before any round
    for r in range(rounds):
        shift = r % len(names)
        expected += [n for n in names[shift:] + names[:shift] for _ in range(repeats)]
    assert order == expected
    assert set(times) == set(names)
    for t in times.values():
        assert t.shape == (rounds, repeats)
        assert np.all(np.isfinite(t)) and np.all(t >= 0)


def test_time_prepared_times_what_each_call_costs(monkeypatch):
    """Each entry is the time of that model's own call: a fake clock advanced by the calls."""
    clock = [0.0]
    cost = {"a": 0.002, "b": 0.005}  # seconds per call

    def fake(name):
        def call():
            clock[0] += cost[name]
        return call

    monkeypatch.setitem(timing.CLOCKS, "wall", lambda: clock[0])
    times = time_prepared({n: fake(n) for n in cost}, threads=1, rounds=3, repeats=2, warmup=1)
    np.testing.assert_allclose(times["a"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(times["b"], 5.0, rtol=1e-6)
