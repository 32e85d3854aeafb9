"""The compatibility matrix: architectures leanconv did not write (tests/compat_zoo.py), each
pruned to half its MACs with l1 and with hap, reloaded to identical outputs and exported to
ONNX within 1e-4 of PyTorch, or refused with one line that names the operation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorchcv", reason="the matrix needs pytorchcv (scripts/setup.sh installs it)")

import compat_zoo  # noqa: E402
from leanconv import checkpoint  # noqa: E402
from leanconv.cost import count  # noqa: E402
from leanconv.data import load_dataset  # noqa: E402
from leanconv.deploy.onnx import export_onnx  # noqa: E402
from leanconv.errors import LeanconvError  # noqa: E402
from leanconv.importance import ScoringData, run_criterion  # noqa: E402
from leanconv.models import from_constructor  # noqa: E402
from leanconv.width import prune_to_budget  # noqa: E402

CASES = [(name, method) for name in compat_zoo.ARCHITECTURES for method in ("l1", "hap")]


def _scoring(side: int) -> tuple[ScoringData, tuple[int, int, int]]:
    data = load_dataset(f"synthetic:n=160,s={side},k={min(10, 2 * (side // 4))}")
    shape = (3, side, side)
    return ScoringData(list(data.loader("val", 4, subset=4).epoch(0)), extra={"input_shape": shape}), shape


@pytest.mark.parametrize("name, method", CASES)
def test_a_foreign_architecture_prunes_reloads_and_exports(name, method, tmp_path):
    _, side, _, outcome = compat_zoo.ARCHITECTURES[name]
    torch.manual_seed(0)
    target = f"compat_zoo:{name}"
    model = from_constructor(target).eval()
    scoring, shape = _scoring(side)
    before = count(model, shape)
    prune = lambda: prune_to_budget(model, run_criterion(method, probes=2), torch.randn(1, *shape),  # noqa: E731
                                    target=0.5, input_shape=shape, data=scoring)
    if outcome != "pruned":
        with pytest.raises(LeanconvError) as refused:
            prune()
        assert outcome in str(refused.value) and "\n" not in str(refused.value)
        assert count(model, shape).macs == before.macs  # the model is left as it was
        return
    prune()
    after = count(model, shape)
    assert abs(after.macs / before.macs - 0.5) <= 0.02 * 0.5 and after.params < before.params
    checkpoint.save(model, tmp_path / "m.safetensors")
    again = checkpoint.load(tmp_path / "m.safetensors", constructor=target)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    if method == "l1":  # the exporter does not care how the channels were chosen: once per architecture
        info = export_onnx(model, shape, tmp_path / "m.onnx", opset=17, latency=False)
        assert info["max_abs_diff"] <= 1e-4
