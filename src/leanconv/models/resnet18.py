"""ResNet-18, CIFAR variant.

Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016),
table 1, 18-layer column: four stages of two BasicBlocks with 64/128/256/512 channels. The
CIFAR variant (common in the pruning literature) replaces the 7x7 stride-2 stem and the
max-pool by one 3x3 stride-1 conv, so 32x32 inputs reach the last stage at 4x4. Shortcuts
that change shape are 1x1 conv + BN ("option B", as in the paper's ImageNet nets).
About 11.17M params and 0.56G MACs on 3x32x32 with 10 classes.

Layer names and ``conv_layer`` use as in :mod:`leanconv.models.resnet_cifar` (stages
``layer1``..``layer4``).
"""

from __future__ import annotations

from leanconv.models.registry import register_model
from leanconv.models.resnet_cifar import ResNet

__all__ = ["resnet18"]


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 for small images; kwargs as :class:`leanconv.models.resnet_cifar.ResNet`."""
    return ResNet(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), strides=(1, 2, 2, 2), **kwargs)
