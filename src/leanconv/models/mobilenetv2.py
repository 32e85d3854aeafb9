"""MobileNetV2, CIFAR variant.

Paper: Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018), table 2. An inverted residual block expands ``C_in`` to
``t * C_in`` channels with a 1x1 conv, filters them with a depthwise 3x3 conv (stride ``s``),
and projects linearly (no activation) to ``C_out`` with a 1x1 conv; the input is added when
``s == 1`` and ``C_in == C_out``. ReLU6 after the expand and depthwise convs.

CIFAR adaptation (common practice for 32x32 inputs): the first two of the paper's five
stride-2 layers, the stem conv and the first block of the 24-channel stage, get stride 1, so
a 32x32 input reaches the head at 4x4 (three halvings left: 32-, 64- and 160-channel
stages). 2.24M params and 88.0M MACs on 3x32x32 with 10 classes.

Layer names: ``stem`` (conv, norm, ReLU6), ``features`` (``nn.Sequential`` of
:class:`InvertedResidual`), ``head`` (1x1 conv to 1280, norm, ReLU6), ``pool``, ``flatten``,
``classifier``. A block holds one ``conv`` ``nn.Sequential``:
``[expand conv, norm, ReLU6,]`` (absent when ``t == 1``) ``dw conv, norm, ReLU6, project
conv, norm``. ``conv_layer`` builds every conv inside blocks (called with ``groups`` for the
depthwise one); stem and head are plain ``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from leanconv.models.registry import check_zoo_args, register_model
from leanconv.models.resnet_cifar import init_weights

__all__ = ["InvertedResidual", "MobileNetV2", "MOBILENETV2_CIFAR_CFG", "mobilenetv2"]

# (expansion t, output channels c, repeats n, stride s of the first repeat); paper table 2
# with the 24-channel stage's stride lowered from 2 to 1 for 32x32 inputs.
MOBILENETV2_CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, plus the input when shapes match."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        expansion: int,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        hidden = in_planes * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                conv_layer(in_planes, hidden, kernel_size=1, stride=1, padding=0, bias=False),
                norm_layer(hidden),
                nn.ReLU6(inplace=False),
            ]
        layers += [
            conv_layer(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False),
            norm_layer(hidden),
            nn.ReLU6(inplace=False),
            conv_layer(hidden, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
            norm_layer(out_planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 built from ``cfg`` rows ``(t, c, n, s)``; see the module docstring."""

    def __init__(
        self,
        cfg: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_CIFAR_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        stem_channels: int = 32,
        head_channels: int = 1280,
    ) -> None:
        super().__init__()
        self.leanconv_meta = check_zoo_args(num_classes, in_channels, input_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, kernel_size=3, stride=1, padding=1, bias=False),
            norm_layer(stem_channels),
            nn.ReLU6(inplace=False),
        )
        blocks: list[nn.Module] = []
        channels = stem_channels
        for expansion, out_planes, repeats, stride in cfg:
            for j in range(repeats):
                blocks.append(InvertedResidual(
                    channels, out_planes, stride if j == 0 else 1, expansion, conv_layer, norm_layer
                ))
                channels = out_planes
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(channels, head_channels, kernel_size=1, bias=False),
            norm_layer(head_channels),
            nn.ReLU6(inplace=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(head_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


@register_model
def mobilenetv2(**kwargs) -> MobileNetV2:
    """MobileNetV2 (width 1.0) for small images; kwargs as :class:`MobileNetV2`."""
    return MobileNetV2(MOBILENETV2_CIFAR_CFG, **kwargs)
