"""The model zoo: ``create(name, **kwargs)`` builds a registered model, ``names()`` lists them.

Importing this package imports every family module so that its ``@register_model``
constructors join the registry. Every constructor accepts ``num_classes=10``,
``in_channels=3``, ``input_size=32``, ``conv_layer=nn.Conv2d`` and
``norm_layer=nn.BatchNorm2d`` (docs/design.md, "Models").
"""

from leanconv.models import mobilenetv2, preact_resnet, resnet18, resnet_cifar, vgg  # noqa: F401 (register)
from leanconv.models.registry import build, create, from_constructor, names, register_model

__all__ = [
    # building models
    "create",
    "names",
    "from_constructor",
    "build",
    # adding models
    "register_model",
]
