"""Pre-activation CIFAR ResNets: PreAct-ResNet-20 and -56.

Paper: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016),
fig. 1(b) / fig. 4(e): each block computes ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` and adds the
shortcut with no activation after the sum; the net ends with BN-ReLU before pooling. Stages
as in the CIFAR ResNets (16/32/64 channels, ``n`` blocks each, depth ``6n + 2``).

A shortcut that changes shape is a 1x1 conv (stride 2) with no norm ("option B"; the next
block starts with its own BN). As in the paper's projection blocks it reads the
pre-activated input ``relu1(bn1(x))``, which the block computes anyway.

Layer names: stem ``conv1``; stages ``layer1..layer3``; ``final_bn``, ``final_relu``, ``pool``,
``flatten``, ``fc``. A block has ``bn1, relu1, conv1, bn2, relu2, conv2, shortcut``.
``conv_layer`` builds the convs inside blocks; stem and shortcuts are plain ``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from leanconv.models.registry import check_zoo_args, register_model
from leanconv.models.resnet_cifar import init_weights, projection_shortcut

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet20", "preact_resnet56"]


def _is_identity(module: nn.Module) -> bool:
    """True for ``nn.Identity`` and an empty ``nn.Sequential``."""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0)


class PreActBlock(nn.Module):
    """Pre-activation BasicBlock: ``conv2(relu2(bn2(conv1(relu1(bn1(x)))))) + shortcut``."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = conv_layer(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = projection_shortcut(in_planes, planes, stride, norm_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # Identity shortcuts carry the raw input; projections read the pre-activated one.
        skip = x if _is_identity(self.shortcut) else self.shortcut(pre)
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + skip


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet with ``n`` blocks in each of three stages (16/32/64)."""

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.leanconv_meta = check_zoo_args(num_classes, in_channels, input_size)
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride if j == 0 else 1, conv_layer, norm_layer))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.final_bn = norm_layer(in_planes)
        self.final_relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.final_relu(self.final_bn(x))
        return self.fc(self.flatten(self.pool(x)))


@register_model
def preact_resnet20(**kwargs) -> PreActResNet:
    """PreAct-ResNet-20 (n=3), about 0.27M params on 3x32x32; kwargs as :class:`PreActResNet`."""
    return PreActResNet(3, **kwargs)


@register_model
def preact_resnet56(**kwargs) -> PreActResNet:
    """PreAct-ResNet-56 (n=9), about 0.85M params on 3x32x32; kwargs as :class:`PreActResNet`."""
    return PreActResNet(9, **kwargs)
