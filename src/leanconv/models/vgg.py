"""VGG-16 with batch norm, CIFAR variant.

Paper: Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015), configuration D, with BN after every conv (Ioffe, Szegedy 2015)
and the CIFAR head common in the pruning literature: the three fully connected layers are
replaced by global average pooling and one ``Linear(512, num_classes)``. About 14.7M params
and 313M MACs on 3x32x32.

Thirteen 3x3 conv + BN + ReLU layers with widths 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M
(M = 2x2 max-pool, stride 2). The pools use ``ceil_mode=True`` so a side that is already 1
stays 1: 28x28 inputs (Fashion-MNIST) go 28-14-7-4-2-1 instead of collapsing to zero.

Layer names: ``features`` (``nn.Sequential`` of conv, norm, ReLU and pool modules),
``pool``, ``flatten``, ``classifier``. ``conv_layer`` builds every conv but the first (which
sees the raw image and is a plain ``nn.Conv2d``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from leanconv.models.registry import check_zoo_args, register_model
from leanconv.models.resnet_cifar import init_weights

__all__ = ["VGG", "VGG16_CFG", "vgg16"]

# Output widths of the conv layers; "M" is a 2x2 max-pool with stride 2.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """Plain conv-BN-ReLU stack described by ``cfg``, global average pool, linear head."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.leanconv_meta = check_zoo_args(num_classes, in_channels, input_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            make = conv_layer if layers else nn.Conv2d
            layers += [
                make(channels, item, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(item),
                nn.ReLU(inplace=False),
            ]
            channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model
def vgg16(**kwargs) -> VGG:
    """VGG-16-BN for small images; kwargs as :class:`VGG` (``num_classes``, ``in_channels``,
    ``input_size``, ``conv_layer``, ``norm_layer``)."""
    return VGG(VGG16_CFG, **kwargs)
