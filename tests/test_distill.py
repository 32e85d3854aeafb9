"""Knowledge distillation while fine-tuning (``--distill``): the loss equals its hand-computed
reference, the teacher stays untouched, runs stay reproducible and resumable, and bad teachers
and options are refused in one line."""

from __future__ import annotations

import shlex

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
from leanconv import checkpoint
from leanconv.cli.main import main
from leanconv.errors import LeanconvError
from leanconv.models import create
from leanconv.runs import PruneConfig, Source, command_line, run_prune
from leanconv.train import TrainConfig, fit
from leanconv.train.distill import Distillation, distillation_loss


def _reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """Hinton et al. (2015) written out: softmax and logs by hand, the KL divergence summed over
    classes and averaged over the batch."""
    s, t = s.double(), t.double()
    log_p = s - s.exp().sum(1, keepdim=True).log()
    ce = -log_p[torch.arange(len(y)), y].mean()
    soft_t = (t / temperature).exp() / (t / temperature).exp().sum(1, keepdim=True)
    log_soft_s = s / temperature - (s / temperature).exp().sum(1, keepdim=True).log()
    kl = (soft_t * (soft_t.log() - log_soft_s)).sum(1).mean()
    return (1 - weight) * ce + weight * temperature ** 2 * kl


@pytest.mark.parametrize("temperature,weight", [(4.0, 0.5), (1.0, 0.3), (2.5, 1.0), (10.0, 0.9)])
def test_the_loss_equals_a_hand_computed_reference(temperature, weight):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    y = torch.randint(0, 5, (8,), generator=g)
    got = distillation_loss(s, t, y, temperature=temperature, weight=weight)
    torch.testing.assert_close(got, _reference(s, t, y, temperature, weight).float())


def test_the_soft_term_is_zero_when_the_student_matches_the_teacher():
    s = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    torch.testing.assert_close(distillation_loss(s, s.clone(), y, temperature=3.0, weight=1.0), torch.tensor(0.0))


def test_weight_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    student, teacher = create("resnet20", num_classes=4, input_size=16), create("resnet20", num_classes=4,
                                                                             input_size=16)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = student(x)
    loss = Distillation(teacher, temperature=4.0, weight=0.0)
    torch.testing.assert_close(loss(out, x, y), F.cross_entropy(out, y))
    torch.testing.assert_close(distillation_loss(out, teacher.eval()(x), y, weight=0.0), F.cross_entropy(out, y))
    # and the teacher's pull is real at weight 1: the loss is then the soft term alone
    soft = Distillation(teacher, weight=1.0)(out, x, y)
    assert not torch.allclose(soft, F.cross_entropy(out, y))


def _tiny_run(tiny_data, loss=None, out_dir=None, resume=False, progress=None, epochs=2):
    torch.manual_seed(0)
    model = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    train = tiny_data.loader("train", 64, shuffle=True, augment=True, seed=0, drop_last=True, subset=128)
    fit(model, train, TrainConfig(epochs=epochs, lr=0.05), loss=loss, out_dir=out_dir, resume=resume,
        progress=progress)
    return model


def _teacher(seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return create("resnet20", num_classes=4, in_channels=3, input_size=16)


def test_fit_with_a_teacher_is_deterministic_and_leaves_the_teacher_alone(tiny_data):
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN statistics included
    a = _tiny_run(tiny_data, Distillation(teacher), epochs=1)
    b = _tiny_run(tiny_data, Distillation(teacher), epochs=1)
    plain = _tiny_run(tiny_data, epochs=1)
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.fc.weight, plain.fc.weight)  # the teacher changed what was learned
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_distilled_run_resumes_exactly_and_refuses_another_loss(tiny_data, tmp_path):
    whole = _tiny_run(tiny_data, Distillation(_teacher()), out_dir=tmp_path / "a")

    def interrupt(done, total, info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tiny_data, Distillation(_teacher()), out_dir=tmp_path / "b", progress=interrupt)
    with pytest.raises(LeanconvError, match="started with another loss"):
        _tiny_run(tiny_data, None, out_dir=tmp_path / "b", resume=True)
    with pytest.raises(LeanconvError, match="started with another loss"):
        _tiny_run(tiny_data, Distillation(_teacher(), temperature=2.0), out_dir=tmp_path / "b", resume=True)
    resumed = _tiny_run(tiny_data, Distillation(_teacher()), out_dir=tmp_path / "b", resume=True)
    for (name, va), vb in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=name)
    meta = checkpoint.load(tmp_path / "b" / "train_state.safetensors").leanconv_meta
    assert meta["train_loss"] == {"distill": {"temperature": 4.0, "weight": 0.5}}


def test_a_teacher_with_other_outputs_is_one_line(tiny_data):
    student = create("resnet20", num_classes=4, in_channels=3, input_size=16)
    teacher = create("resnet20", num_classes=10, in_channels=3, input_size=16)
    with pytest.raises(LeanconvError, match=r"teacher's outputs have shape \(2, 10\) but the student's \(2, 4\)") as e:
        Distillation(teacher).check(student, torch.randn(2, 3, 16, 16))
    assert "\n" not in str(e.value) and "drop --distill" in str(e.value)
    with pytest.raises(LeanconvError, match="teacher's outputs have shape"):  # and inside the loop, before a step
        _tiny_run(tiny_data, Distillation(teacher), epochs=1)
    with pytest.raises(LeanconvError, match="needs class logits"):
        Distillation(nn.Identity()).check(student, torch.randn(2, 3, 16, 16))
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,)))]
    weights = student.fc.weight.clone()
    with pytest.raises(LeanconvError, match="teacher's outputs have shape"):
        leanconv.finetune(student, batches, teacher=teacher)
    assert torch.equal(student.fc.weight, weights)  # refused before any step


def test_the_python_finetune_distils_from_a_teacher():
    torch.manual_seed(0)
    student, teacher = create("resnet20", num_classes=4, input_size=16), _teacher()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))) for _ in range(2)]
    plain = leanconv.finetune(_copy(student), batches, epochs=1, seed=1)
    taught = leanconv.finetune(_copy(student), batches, epochs=1, seed=1, teacher=teacher, distill_weight=1.0)
    assert not torch.equal(plain.fc.weight, taught.fc.weight)
    with pytest.raises(LeanconvError, match="--distill-weight must be a finite number >= 0 and <= 1"):
        leanconv.finetune(student, batches, teacher=teacher, distill_weight=2.0)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_a_prune_run_distils_in_every_round(tiny_data, monkeypatch):
    """With --steps 2 each round's fine-tuning gets the teacher; the record states the settings."""
    from leanconv.runs import prune as prune_run

    seen = []
    real = prune_run.finetune

    def spy(model, data, **kwargs):
        seen.append(kwargs.get("loss"))
        return real(model, data, **kwargs)

    monkeypatch.setattr(prune_run, "finetune", spy)
    torch.manual_seed(0)
    model = create("resnet20", in_channels=3, input_size=16, num_classes=4)
    model.leanconv_meta = {"input_shape": [3, 16, 16], "num_classes": 4}
    config = PruneConfig(method="l1", target=0.5, steps=2, finetune_epochs=2, distill=True, distill_temperature=2.0,
                         distill_weight=0.7, score_images=32, latency_repeats=1, train_subset=128, batch_size=32,
                         reconstruct_images=32)
    record = run_prune(config, Source(tiny_data, model=model), measured=False).record.to_dict()
    assert len(seen) == 2 and all(isinstance(s, Distillation) for s in seen) and seen[0] is seen[1]
    assert seen[0].temperature == 2.0 and seen[0].weight == 0.7 and not seen[0].teacher.training
    dist = record["distillation"]
    assert dist["teacher"] == "the unpruned model" and dist["temperature"] == 2.0 and dist["weight"] == 0.7
    assert abs(record["achieved"]["macs"] - 0.5) <= 0.01 and record["regularization"] is None
    # the teacher is the unpruned model: it still has every channel
    assert seen[0].teacher.fc.in_features == 64 and sum(p.numel() for p in seen[0].teacher.parameters()) == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("extra,match", [
    (["--distill-temperature", "2"], "--distill-temperature sets the distillation of --distill: add --distill"),
    (["--distill-weight", "0.9"], "--distill-weight sets the distillation of --distill"),
    (["--distill"], "--distill acts while fine-tuning: give --finetune-epochs N"),
    (["--distill", "--finetune-epochs", "1", "--distill-weight", "1.5"],
     "--distill-weight must be a finite number >= 0 and <= 1, got 1.5"),
    (["--distill", "--finetune-epochs", "1", "--distill-weight", "-0.1"], "--distill-weight must be a finite number"),
    (["--distill", "--finetune-epochs", "1", "--distill-temperature", "0"],
     "--distill-temperature must be a finite number above 0"),
    (["--distill", "--finetune-epochs", "1", "--distill-temperature", "inf"], "--distill-temperature must be a finite"),
    (["--distill", "--finetune-epochs", "1", "--distill-temperature", "1e9"], "above 0 and <= 1000"),
])
def test_bad_distillation_options_are_one_line(untrained_ckpt, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    code = main(["prune", str(untrained_ckpt), "--target-flops", "0.5", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("leanconv: error:") and match in err[0], err
    assert not out.exists()


def test_the_options_round_trip_through_the_reproducing_command(untrained_ckpt, tmp_path):
    from leanconv.cli import prune as prune_cli
    from leanconv.cli.main import build_parser

    config = PruneConfig(method="l1", finetune_epochs=3, distill=True, distill_temperature=2.5, distill_weight=0.8)
    words = shlex.split(command_line(config, Source.from_checkpoint(untrained_ckpt), tmp_path / "o"))
    assert {"--distill", "--distill-temperature", "--distill-weight"} <= set(words)
    assert prune_cli.config_from_args(build_parser().parse_args(words[1:])) == config
