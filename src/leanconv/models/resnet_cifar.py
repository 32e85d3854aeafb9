"""CIFAR ResNets with BasicBlocks: ResNet-20/32/44/56/110.

Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016),
section 4.2: a 3x3 stem conv with 16 filters, then three stages of ``n`` BasicBlocks with
16, 32 and 64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling and a linear classifier; depth ``6n + 2``.

Our one change from the paper's CIFAR nets: a shortcut that changes shape is a 1x1 conv
(stride 2) + BN ("option B") instead of zero-padding ("option A"), so that channel pruning
can follow it (docs/design.md). This adds 2,752 parameters and 0.26M MACs to ResNet-20
(published: 0.27M params, 40.8M MACs for 3x32x32).

Layer names (relied on by pruning and checkpoint edits): stem ``conv1``/``bn1``/``relu``,
stages ``layer1``..``layerK`` (``nn.Sequential`` of blocks), ``pool``, ``flatten``, ``fc``.
A block has ``conv1, bn1, relu1, conv2, bn2, shortcut, relu2``; ``shortcut`` is an empty
``nn.Sequential`` (identity) or ``Sequential(conv 1x1, norm)``.

``conv_layer`` (anything with ``nn.Conv2d``'s signature, a class or a factory) builds the
convs inside blocks; the stem, which sees the raw image, and the projection shortcuts are
always plain ``nn.Conv2d``. ``norm_layer(num_features)`` builds every norm.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from leanconv.models.registry import check_zoo_args, register_model

__all__ = [
    "BasicBlock",
    "ResNet",
    "init_weights",
    "projection_shortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

ConvLayer = Callable[..., nn.Module]
NormLayer = Callable[[int], nn.Module]


def projection_shortcut(
    in_planes: int, planes: int, stride: int, norm_layer: NormLayer | None
) -> nn.Sequential:
    """Option-B shortcut: empty ``Sequential`` (identity) when the shape is unchanged, else a
    1x1 conv with ``stride`` followed by ``norm_layer`` (omitted when ``norm_layer`` is None)."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    conv = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv) if norm_layer is None else nn.Sequential(conv, norm_layer(planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, ReLU after the residual add (He et al. 2016, fig. 2 left)."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        conv_layer: ConvLayer = nn.Conv2d,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv_layer(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut = projection_shortcut(in_planes, planes, stride, norm_layer)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convs (fan_out, ReLU gain), unit/zero BN, default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """A 3x3-stem ResNet of BasicBlocks for small images (no max-pool after the stem).

    ``widths[i]`` channels and ``depths[i]`` blocks in stage ``i + 1``, whose first block
    has stride ``strides[i]``. Global adaptive average pooling makes any input side work.
    """

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        conv_layer: ConvLayer = nn.Conv2d,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.leanconv_meta = check_zoo_args(num_classes, in_channels, input_size)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=False)
        in_planes = widths[0]
        for i, (planes, depth, stride) in enumerate(zip(widths, depths, strides, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, conv_layer, norm_layer))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_stages = len(widths)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.pool(x)))


def _cifar_resnet(n: int, **kwargs) -> ResNet:
    """ResNet of depth ``6n + 2``: stages of 16/32/64 channels, ``n`` blocks each."""
    return ResNet(widths=(16, 32, 64), depths=(n, n, n), strides=(1, 2, 2), **kwargs)


@register_model
def resnet20(**kwargs) -> ResNet:
    """ResNet-20 (n=3): 0.27M params, 40.8M MACs on 3x32x32 with option-B shortcuts."""
    return _cifar_resnet(3, **kwargs)


@register_model
def resnet32(**kwargs) -> ResNet:
    """ResNet-32 (n=5): about 0.47M params, 69M MACs on 3x32x32."""
    return _cifar_resnet(5, **kwargs)


@register_model
def resnet44(**kwargs) -> ResNet:
    """ResNet-44 (n=7): about 0.66M params, 97M MACs on 3x32x32."""
    return _cifar_resnet(7, **kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    """ResNet-56 (n=9): 0.85M params, 125.5M MACs on 3x32x32."""
    return _cifar_resnet(9, **kwargs)


@register_model
def resnet110(**kwargs) -> ResNet:
    """ResNet-110 (n=18): 1.73M params, 253M MACs on 3x32x32."""
    return _cifar_resnet(18, **kwargs)
