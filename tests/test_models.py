"""The model zoo: shapes, published sizes, layer-type plumbing, pruning-friendly structure."""

import pytest
import torch
from torch import nn

import leanconv.models as zoo
from leanconv.errors import LeanconvError

NAMES = zoo.names()


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model: nn.Module, shape=(3, 32, 32)) -> int:
    """Conv2d and Linear multiply-adds for one image, counted by forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


def test_zoo_lists_every_family():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "preact_resnet20",
            "preact_resnet56", "vgg16", "mobilenetv2", "resnet18"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_cifar_shape(name):
    torch.manual_seed(0)
    model = zoo.create(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert model.leanconv_base == {"zoo": name, "kwargs": {}}
    assert model.leanconv_meta["input_shape"] == [3, 32, 32]


@pytest.mark.parametrize("name", NAMES)
def test_grayscale_28_seven_classes(name):
    model = zoo.create(name, in_channels=1, input_size=28, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    assert model.leanconv_meta == {"input_shape": [1, 28, 28], "num_classes": 7}
    assert model.leanconv_base["kwargs"] == {"in_channels": 1, "input_size": 28, "num_classes": 7}


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mobilenetv2"])
def test_smallest_side_eight_works(name):
    with torch.no_grad():
        out = zoo.create(name, in_channels=1, input_size=8).eval()(torch.randn(1, 1, 8, 8))
    assert out.shape == (1, 10)


# name -> (published params, published MACs) for 3x32x32 and 10 classes (shared/methods.md;
# ResNet-18 from the pSConv repository, VGG-16 from the pruning literature).
PUBLISHED = {
    "resnet20": (0.27e6, 40.8e6),
    "resnet56": (0.85e6, 125.5e6),
    "resnet110": (1.73e6, 252.9e6),
    "resnet18": (11.17e6, 0.56e9),
    "vgg16": (14.7e6, 313e6),
    "mobilenetv2": (2.24e6, 88.0e6),  # our CIFAR variant's own count, pinned against drift
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_params_and_macs_within_two_percent(name):
    params, macs = PUBLISHED[name]
    model = zoo.create(name)
    assert _count_params(model) == pytest.approx(params, rel=0.02)
    assert _count_macs(model) == pytest.approx(macs, rel=0.02)


def test_resnet20_exact_counts():
    # Option A: 269,722 params; option B adds 1x1 convs 16->32, 32->64 and their BNs.
    model = zoo.create("resnet20")
    assert _count_params(model) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert _count_macs(model) == 40_813_184


class CountingConv(nn.Conv2d):
    """A Conv2d that counts its forward calls."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


class TaggedNorm(nn.BatchNorm2d):
    pass


# Convs that stay plain nn.Conv2d whatever conv_layer is: stem, projection shortcuts, head.
PLAIN_CONVS = {
    "resnet20": 3, "resnet32": 3, "resnet44": 3, "resnet56": 3, "resnet110": 3,
    "preact_resnet20": 3, "preact_resnet56": 3, "resnet18": 4, "vgg16": 1, "mobilenetv2": 2,
}


@pytest.mark.parametrize("name", NAMES)
def test_custom_layer_types_are_used_in_blocks(name):
    model = zoo.create(name, conv_layer=CountingConv, norm_layer=TaggedNorm).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    custom = [m for m in convs if isinstance(m, CountingConv)]
    assert len(convs) - len(custom) == PLAIN_CONVS[name]
    assert len(custom) >= 6
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert all(getattr(m, "calls", 0) == 1 for m in custom)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, TaggedNorm) for m in norms)


def test_resnet_block_layout():
    model = zoo.create("resnet20", conv_layer=CountingConv)
    first, down = model.layer1[0], model.layer2[0]
    assert isinstance(first.conv1, CountingConv) and isinstance(first.conv2, CountingConv)
    assert isinstance(first.shortcut, nn.Sequential) and len(first.shortcut) == 0
    conv, norm = down.shortcut
    assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert (conv.in_channels, conv.out_channels) == (16, 32) and isinstance(norm, nn.BatchNorm2d)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [3, 3, 3]
    assert len(zoo.create("resnet110").layer3) == 18


def test_blocks_with_zeroed_residual_branch_pass_the_input():
    x = torch.randn(2, 16, 8, 8)
    block = zoo.create("preact_resnet20").layer1[1].eval()
    nn.init.zeros_(block.conv2.weight)
    torch.testing.assert_close(block(x), x)

    block = zoo.create("resnet20").layer1[1].eval()
    nn.init.zeros_(block.bn2.weight)
    torch.testing.assert_close(block(x), torch.relu(x))

    mnet = zoo.create("mobilenetv2")
    block = mnet.features[2].eval()  # second 24-channel block: stride 1, 24 -> 24
    assert block.use_residual
    nn.init.zeros_(block.conv[-1].weight)
    x24 = torch.randn(2, 24, 8, 8)
    torch.testing.assert_close(block(x24), x24 + block.conv[-1].bias.view(1, -1, 1, 1))


def test_block_replaced_by_identity_keeps_model_working():
    model = zoo.create("resnet56").eval()
    model.layer2[4] = nn.Identity()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cifar_downsampling():
    # MobileNetV2 (stem and 24-channel stage at stride 1) reaches 4x4; VGG 1x1; ResNet-18 4x4.
    with torch.no_grad():
        mnet = zoo.create("mobilenetv2").eval()
        assert mnet.features(mnet.stem(torch.zeros(1, 3, 32, 32))).shape == (1, 320, 4, 4)
        vgg = zoo.create("vgg16", in_channels=1).eval()
        assert vgg.features(torch.zeros(1, 1, 28, 28)).shape == (1, 512, 1, 1)
        r18 = zoo.create("resnet18").eval()
        x = r18.relu(r18.bn1(r18.conv1(torch.zeros(1, 3, 32, 32))))
        assert r18.layer4(r18.layer3(r18.layer2(r18.layer1(x)))).shape == (1, 512, 4, 4)


@pytest.mark.parametrize("name", NAMES)
def test_no_inplace_activations(name):
    flags = [m.inplace for m in zoo.create(name).modules() if hasattr(m, "inplace")]
    assert flags and not any(flags)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = zoo.create(name).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad.abs().sum() > 0


def test_unknown_model_and_bad_arguments_raise():
    with pytest.raises(LeanconvError, match="nope"):
        zoo.create("nope")
    with pytest.raises(LeanconvError, match="num_classes"):
        zoo.create("resnet20", num_classes=0)
    with pytest.raises(LeanconvError, match="input_size"):
        zoo.create("vgg16", input_size=4)
    with pytest.raises(LeanconvError, match="in_channels"):
        zoo.create("mobilenetv2", in_channels=2.5)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "mobilenetv2"])
def test_torch_pruning_traces_and_shrinks(name):
    tp = pytest.importorskip("torch_pruning")
    model = zoo.create(name).eval()
    head = model.fc if hasattr(model, "fc") else model.classifier
    x = torch.randn(1, 3, 32, 32)
    before = _count_params(model)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[head])
    pruner.step()
    assert _count_params(model) < 0.4 * before
    with torch.no_grad():
        assert model(x).shape == (1, 10)
