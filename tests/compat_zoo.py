"""Architectures leanconv did not write: small configurations of third-party model definitions.

Each function here is the kind of constructor a user writes around a model library
(``pytorchcv``: pure-PyTorch model files; installed by scripts/setup.sh without its
dependencies, as an optional test dependency; no weights are downloaded): it picks a small
width and 4 classes and makes the final pooling adaptive so that a 32x32 or 64x64 input
works (CIFAR variants take 10 classes). ``ARCHITECTURES`` lists them with the input side,
what each one exercises and what leanconv makes of it (``"pruned"``, or the start of the one
line it refuses the model with). """

from __future__ import annotations

from torch import nn

CLASSES = 10


def _adaptive(model: nn.Module) -> nn.Module:
    """Replace the fixed final average pool of ImageNet models by a global one (any input side)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AvgPool2d) and name.endswith("final_pool"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.AdaptiveAvgPool2d(1))
    return model


def seresnet20():
    from pytorchcv.models.seresnet_cifar import get_seresnet_cifar
    return _adaptive(get_seresnet_cifar(num_classes=CLASSES, blocks=20, bottleneck=False))


def densenet40():
    from pytorchcv.models.densenet_cifar import get_densenet_cifar
    return _adaptive(get_densenet_cifar(num_classes=CLASSES, blocks=40, growth_rate=12, bottleneck=False))


def resnext20():
    from pytorchcv.models.resnext_cifar import get_resnext_cifar
    return _adaptive(get_resnext_cifar(num_classes=CLASSES, blocks=20, cardinality=16, bottleneck_width=4))


def preresnet20():
    from pytorchcv.models.preresnet_cifar import get_preresnet_cifar
    return _adaptive(get_preresnet_cifar(num_classes=CLASSES, blocks=20, bottleneck=False))


def pyramidnet20():
    from pytorchcv.models.pyramidnet_cifar import get_pyramidnet_cifar
    return _adaptive(get_pyramidnet_cifar(num_classes=CLASSES, blocks=20, alpha=48, bottleneck=False))


def mobilenetv2():
    from pytorchcv.models.mobilenetv2 import get_mobilenetv2
    return _adaptive(get_mobilenetv2(width_scale=0.5, num_classes=CLASSES, in_size=(64, 64)))


def mobilenetv3():
    from pytorchcv.models.mobilenetv3 import get_mobilenetv3
    return _adaptive(get_mobilenetv3(version="small", width_scale=0.75, num_classes=CLASSES, in_size=(64, 64)))


def shufflenetv2():
    from pytorchcv.models.shufflenetv2 import get_shufflenetv2
    return _adaptive(get_shufflenetv2(width_scale=0.5, num_classes=CLASSES, in_size=(64, 64)))


def shufflenet():
    from pytorchcv.models.shufflenet import get_shufflenet
    return _adaptive(get_shufflenet(groups=3, width_scale=0.5, num_classes=CLASSES, in_size=(64, 64)))


def efficientnet():
    from pytorchcv.models.efficientnet import get_efficientnet
    return _adaptive(get_efficientnet(version="b0", num_classes=CLASSES, in_size=(224, 224)))  # run at 64


def mixnet():
    from pytorchcv.models.mixnet import get_mixnet
    return _adaptive(get_mixnet(version="s", width_scale=0.5, num_classes=CLASSES, in_size=(64, 64)))


def squeezenet():
    from pytorchcv.models.squeezenet import get_squeezenet
    model = get_squeezenet(version="1.1", residual=False, num_classes=CLASSES, in_size=(64, 64))
    return _adaptive(model)


def ghostnet():
    from pytorchcv.models.ghostnet import get_ghostnet
    return _adaptive(get_ghostnet(width_scale=0.5, num_classes=CLASSES, in_size=(64, 64)))


def peleenet():
    from pytorchcv.models.peleenet import get_peleenet
    return _adaptive(get_peleenet(num_classes=CLASSES, in_size=(64, 64)))


def regnetx():
    from pytorchcv.models.regnet import get_regnet
    return _adaptive(get_regnet(channels_init=24, channels_slope=36.44, channels_mult=2.49, depth=13, groups=8,
                                num_classes=CLASSES, in_size=(64, 64)))


SHUFFLE = "operation TransposeBackward, which leanconv cannot follow channel by channel"
RESHAPE = "the dependency graph cannot follow this model's channels through a reshape of the channel dimension"
SPLIT = "cannot be pruned: a split of the channel dimension"
TWICE = "a layer that reads the same channels twice"

# name -> (constructor, input side, what it exercises, "pruned" or how leanconv refuses it)
ARCHITECTURES = {
    "seresnet20": (seresnet20, 16, "squeeze-and-excitation", "pruned"),
    "densenet40": (densenet40, 16, "dense concatenation", "pruned"),
    "resnext20": (resnext20, 16, "grouped convs", "pruned"),
    "preresnet20": (preresnet20, 16, "pre-activation residuals", "pruned"),
    "pyramidnet20": (pyramidnet20, 16, "zero-padded shortcuts", "pruned"),
    "mobilenetv2": (mobilenetv2, 32, "depthwise convs, linear bottlenecks", "pruned"),
    "mobilenetv3": (mobilenetv3, 32, "hardswish, squeeze-and-excitation", "pruned"),
    "efficientnet": (efficientnet, 32, "SiLU (swish), squeeze-and-excitation", "pruned"),
    "squeezenet": (squeezenet, 32, "fire modules (concat of 1x1 and 3x3)", "pruned"),
    "peleenet": (peleenet, 32, "multi-branch stem, dense blocks", "pruned"),
    "regnetx": (regnetx, 32, "grouped bottlenecks", "pruned"),
    "shufflenet": (shufflenet, 32, "grouped 1x1 convs and channel shuffle", SHUFFLE),
    "shufflenetv2": (shufflenetv2, 32, "channel split and shuffle", RESHAPE),
    "mixnet": (mixnet, 32, "mixed kernel sizes (channel split, concat)", SPLIT),
    "ghostnet": (ghostnet, 32, "ghost modules (a tensor concatenated with a function of itself)", TWICE),
}
