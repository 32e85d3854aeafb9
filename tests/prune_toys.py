"""Tiny networks for the pruning tests: each shows one kind of channel coupling."""

import torch
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, groups: int = 1, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ResToy(nn.Module):
    """stem -> residual block (conv_a, conv_b, add) -> conv_c -> pool -> fc."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, width))
        self.conv_a, self.bn_a, self.relu_a = cbr(width, width)
        self.conv_b, self.bn_b, _ = cbr(width, width)
        self.conv_c, self.bn_c, self.relu_c = cbr(width, 6)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn_b(self.conv_b(self.relu_a(self.bn_a(self.conv_a(x))))))
        x = self.relu_c(self.bn_c(self.conv_c(x)))
        return self.fc(self.pool(x).flatten(1))


class DepthwiseToy(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 project, plus the input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 8))
        self.expand = nn.Sequential(*cbr(8, 16, k=1))
        self.dw = nn.Sequential(*cbr(16, 16, groups=16))
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(self.pool(x).flatten(1))


class CatToy(nn.Module):
    """Two branches concatenated, a shared BN, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(self.pool(torch.relu(self.c(y))).flatten(1))


class GroupedToy(nn.Module):
    """conv1 -> grouped 3x3 (2 groups) -> grouped 1x1 (3 groups) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(*cbr(3, 8))
        self.gconv = nn.Sequential(*cbr(8, 12, groups=2))
        self.g1x1 = nn.Sequential(*cbr(12, 6, k=1, groups=3))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.pool(self.g1x1(self.gconv(self.conv1(x)))).flatten(1))


class FlattenToy(nn.Module):
    """conv -> 2x2 pool -> flatten (4 positions per channel) -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(*cbr(3, 4))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


class Scale(nn.Module):
    """A per-channel scale with its own parameter: not a layer leanconv can resize."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight[None, :, None, None]


class ScaleToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(*cbr(3, 6))
        self.scale = Scale(6)
        self.conv2 = nn.Sequential(*cbr(6, 5))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.scale(self.conv1(x)))).flatten(1))


class RollToy(nn.Module):
    """Channels rotated by torch.roll between two convs: an op that moves channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.conv2(torch.roll(self.conv1(x), 1, dims=1))
        return self.fc(y.mean((2, 3)))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights (eval-mode outputs then
    depend on them, so a mis-sliced BN shows up in comparisons)."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def silence(model: nn.Module, group, channels) -> None:
    """Zero every weight that reads the group's ``channels``, so they cannot affect the output."""
    with torch.no_grad():
        for m in group.members:
            if m.kind != "in":
                continue
            module = model.get_submodule(m.module)
            w = module.weight
            for k in channels:
                j = m.idxs[k]
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    per_in, per_out = w.shape[1], w.shape[0] // module.groups
                    w.view(module.groups, per_out, per_in, -1)[j // per_in, :, j % per_in] = 0
                else:
                    w[:, j] = 0


def l1_scores(model: nn.Module, groups, data=None) -> list[torch.Tensor]:
    """Minimal L1 criterion: sum of |filter| over the group's conv/linear output members."""
    scores = []
    for g in groups:
        s = torch.zeros(g.size)
        for m in g.out_members():
            mod = model.get_submodule(m.module)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                s += mod.weight.detach()[list(m.idxs)].abs().flatten(1).sum(1)
        scores.append(s)
    return scores
