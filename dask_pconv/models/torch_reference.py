"""PyTorch definitions of the networks this library ships (:class:`~dask_pconv.models.ResNet18`,
:class:`~dask_pconv.models.UNet`), written as ordinary ``nn.Module``\\ s independently of their
programs: what the tests check the programs against, and what the benchmarks time PyTorch
with.  Their parameter names are the programs' under :func:`torch_name`.  Needs PyTorch
(imported with this module).
"""

import torch
from torch import nn
from torch.nn import functional as F

from .pytorch import torch_name

__all__ = ["BasicBlock", "DoubleConv", "ResNet18", "UNet", "torch_modules", "torch_name"]


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, n_classes=10, in_channels=3, width=1.0):
        super().__init__()
        ch = lambda c: max(1, int(round(c * width)))  # noqa: E731
        c_in = ch(64)
        self.conv1 = nn.Conv2d(in_channels, c_in, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        for s, (c, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            blocks = [BasicBlock(c_in, ch(c), stride), BasicBlock(ch(c), ch(c), 1)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            c_in = ch(c)
        self.linear = nn.Linear(c_in, n_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


class DoubleConv(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class UNet(nn.Module):
    def __init__(self, in_channels=1, n_classes=2, width=8, depth=2):
        super().__init__()
        self.depth, c_in = depth, in_channels
        for level in range(depth):
            setattr(self, f"down{level}", DoubleConv(c_in, width * 2**level))
            c_in = width * 2**level
        self.bottom = DoubleConv(c_in, width * 2**depth)
        c_in = width * 2**depth
        for level in reversed(range(depth)):
            c = width * 2**level
            setattr(self, f"up{level}", nn.ConvTranspose2d(c_in, c, 2, stride=2))
            setattr(self, f"dec{level}", DoubleConv(2 * c, c))
            c_in = c
        self.head = nn.Conv2d(c_in, n_classes, 1)

    def forward(self, x):
        skips = []
        for level in range(self.depth):
            x = getattr(self, f"down{level}")(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for level in reversed(range(self.depth)):
            x = torch.cat([getattr(self, f"up{level}")(x), skips[level]], dim=1)
            x = getattr(self, f"dec{level}")(x)
        return self.head(x)


def torch_modules():
    """``(ResNet18, UNet)``: the two network classes."""
    return ResNet18, UNet
