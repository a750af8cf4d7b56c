"""A CIFAR ResNet-18 (He et al., 2016): the torchvision ``BasicBlock`` network with a 3x3 stem
and no stem pooling, as used for 32x32 images, as a program of layer nodes.

Node names follow the PyTorch module paths of that network (``conv1``, ``bn1``,
``layer2.0.conv1``, ``layer2.0.shortcut.0``, ``linear``), so its parameters are
``layer2.0.conv1.W``, ``layer2.0.bn1.gamma`` and so on.  BatchNorm has PyTorch's defaults
(eps 1e-5, momentum 0.1, i.e. decay 0.9).
"""

from __future__ import annotations

import numpy as np

from .layers import AdaptiveAvgPool2d, Add, BatchNorm, Conv2d, Flatten, Linear, ReLU
from .model import Model
from .program import INPUT, Node, Program

__all__ = ["RESNET18_STAGES", "ResNet18", "resnet18_program"]

#: (output channels, stride of the first block) of the four stages, two blocks each
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BN_EPS = 1e-5  # PyTorch's BatchNorm2d default


def _basic_block(nodes, prefix, source, c_in, c_out, stride):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the shortcut (a strided 1x1 conv and BN where
    the shape changes, the block's input otherwise), then ReLU; returns the output's node."""
    nodes += [
        Node(f"{prefix}.conv1", Conv2d(c_in, c_out, 3, stride=stride, padding=1), (source,)),
        Node(f"{prefix}.bn1", BatchNorm(c_out, eps=BN_EPS, relu=True), (f"{prefix}.conv1",)),
        Node(f"{prefix}.conv2", Conv2d(c_out, c_out, 3, padding=1), (f"{prefix}.bn1",)),
        Node(f"{prefix}.bn2", BatchNorm(c_out, eps=BN_EPS), (f"{prefix}.conv2",)),
    ]
    shortcut = source
    if stride != 1 or c_in != c_out:
        nodes += [
            Node(f"{prefix}.shortcut.0", Conv2d(c_in, c_out, 1, stride=stride), (source,)),
            Node(f"{prefix}.shortcut.1", BatchNorm(c_out, eps=BN_EPS), (f"{prefix}.shortcut.0",)),
        ]
        shortcut = f"{prefix}.shortcut.1"
    nodes += [
        Node(f"{prefix}.add", Add(), (f"{prefix}.bn2", shortcut)),
        Node(f"{prefix}.relu", ReLU(), (f"{prefix}.add",)),
    ]
    return f"{prefix}.relu"


def resnet18_program(n_classes=10, in_channels=3, width=1.0, stages=RESNET18_STAGES, blocks=2):
    """The CIFAR ResNet-18 as a :class:`~dask_pconv.models.program.Program`.

    Parameters
    ----------
    n_classes : int
        Outputs of the last layer, ``linear``.
    in_channels : int
        Channels of the input images.
    width : float
        Scales every channel count (at least 1 each).
    stages : tuple of (int, int)
        ``(output channels, stride of the first block)`` per stage, before ``width``; other
        values give other members of the family.
    blocks : int
        Basic blocks per stage.

    Returns
    -------
    Program
        Input ``(N, in_channels, H, W)`` of any size (the global average pool before the
        classifier makes the logits ``(N, n_classes)``); node names the PyTorch module paths.
    """
    ch = lambda c: max(1, int(round(c * width)))  # noqa: E731
    c_in = ch(stages[0][0])
    nodes = [
        Node("conv1", Conv2d(in_channels, c_in, 3, padding=1), (INPUT,)),
        Node("bn1", BatchNorm(c_in, eps=BN_EPS, relu=True), ("conv1",)),
    ]
    out = "bn1"
    for s, (c, stride) in enumerate(stages, 1):
        for b in range(blocks):
            out = _basic_block(nodes, f"layer{s}.{b}", out, c_in, ch(c), stride if b == 0 else 1)
            c_in = ch(c)
    nodes += [
        Node("avgpool", AdaptiveAvgPool2d(1), (out,)),
        Node("flatten", Flatten(), ("avgpool",)),
        Node("linear", Linear(c_in, n_classes, bias=True, channel_split=False), ("flatten",)),
    ]
    return Program(tuple(nodes))


class ResNet18(Model):
    """A CIFAR ResNet-18 (:func:`resnet18_program`) and its parameters.

    Parameters
    ----------
    n_classes, in_channels, width
        As in :func:`resnet18_program`.
    seed, dtype, channel_split
        As in :class:`~dask_pconv.models.Model`.
    """

    def __init__(self, n_classes=10, in_channels=3, width=1.0, seed=0, dtype=np.float32, channel_split=1):
        program = resnet18_program(n_classes, in_channels, width)
        super().__init__(program, seed=seed, dtype=dtype, channel_split=channel_split)
        self.n_classes, self.in_channels, self.width = n_classes, in_channels, width
