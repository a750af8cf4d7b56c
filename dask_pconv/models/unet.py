"""A small U-Net (Ronneberger et al., 2015) for per-pixel classification, as a program of layer
nodes: an encoder of (3x3 conv, BatchNorm, ReLU) x 2 blocks with 2x2 max-pools between them,
a decoder of 2x2 stride-2 transposed convolutions, each concatenated with the encoder's block
of the same size, and a 1x1 convolution to the class logits.  "Same" convolutions throughout,
so the output has the input's height and width.  Those must be multiples of ``2**depth``
(each pool halves them, flooring, and each transposed convolution doubles them back, so other
sizes would not meet their skip connection): :class:`UNet` refuses other images with a
``ValueError`` naming the size it needs, before building any graph.

Node names follow the PyTorch module paths of the same network written as ``nn.Module``\\ s
(``down0.conv1``, ``up1``, ``dec1.bn2``, ``head``).
"""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm, Concat, Conv2d, ConvTranspose2d, MaxPool2d
from .model import Model
from .program import INPUT, Node, Program

__all__ = ["UNet", "unet_program"]

BN_EPS = 1e-5


def _double_conv(nodes, prefix, source, c_in, c_out):
    nodes += [
        Node(f"{prefix}.conv1", Conv2d(c_in, c_out, 3, padding=1), (source,)),
        Node(f"{prefix}.bn1", BatchNorm(c_out, eps=BN_EPS, relu=True), (f"{prefix}.conv1",)),
        Node(f"{prefix}.conv2", Conv2d(c_out, c_out, 3, padding=1), (f"{prefix}.bn1",)),
        Node(f"{prefix}.bn2", BatchNorm(c_out, eps=BN_EPS, relu=True), (f"{prefix}.conv2",)),
    ]
    return f"{prefix}.bn2"


def unet_program(in_channels=1, n_classes=2, width=8, depth=2):
    """The U-Net as a :class:`~dask_pconv.models.program.Program`.

    Parameters
    ----------
    in_channels : int
        Channels of the input images.
    n_classes : int
        Output channels of ``head``: the classes of each pixel.
    width : int
        Channels of the first level; level ``l`` has ``width * 2**l`` (``bottom`` has
        ``width * 2**depth``).
    depth : int
        Number of 2x2 max-pools (and of transposed convolutions back up), at least 1.

    Returns
    -------
    Program
        Input ``(N, in_channels, H, W)``, ``H`` and ``W`` multiples of ``2**depth`` (the
        program itself does not check it; :class:`UNet` does); output
        ``(N, n_classes, H, W)`` logits.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth {depth}, width {width}")
    nodes, skips, source, c_in = [], [], INPUT, in_channels
    for level in range(depth):
        c = width * 2**level
        skips.append((_double_conv(nodes, f"down{level}", source, c_in, c), c))
        nodes.append(Node(f"pool{level}", MaxPool2d(2), (skips[-1][0],)))
        source, c_in = f"pool{level}", c
    source, c_in = _double_conv(nodes, "bottom", source, c_in, width * 2**depth), width * 2**depth
    for level in reversed(range(depth)):
        skip, c = skips[level]
        nodes += [
            Node(f"up{level}", ConvTranspose2d(c_in, c, 2, stride=2, bias=True), (source,)),
            Node(f"cat{level}", Concat(), (f"up{level}", skip)),
        ]
        source, c_in = _double_conv(nodes, f"dec{level}", f"cat{level}", 2 * c, c), c
    nodes.append(Node("head", Conv2d(c_in, n_classes, 1, bias=True), (source,)))
    return Program(tuple(nodes))


class UNet(Model):
    """A small U-Net (:func:`unet_program`) and its parameters.

    Parameters
    ----------
    in_channels, n_classes, width, depth
        As in :func:`unet_program`.
    seed, dtype, channel_split
        As in :class:`~dask_pconv.models.Model`.

    Notes
    -----
    :meth:`~dask_pconv.models.Model.forward`, :meth:`~dask_pconv.models.Model.forward_backward`
    and :meth:`~dask_pconv.models.Model.predict` (and so a training step) take
    ``(N, in_channels, H, W)`` images with ``H`` and ``W`` multiples of ``2**depth`` and raise
    ``ValueError`` for any other shape; ``features`` of the encoder's nodes takes any size their
    layers accept.  Labels are per pixel, ``(N, H, W)``; the logits are ``(N, n_classes, H, W)``.
    """

    def __init__(
        self, in_channels=1, n_classes=2, width=8, depth=2, seed=0, dtype=np.float32, channel_split=1
    ):
        program = unet_program(in_channels, n_classes, width, depth)
        super().__init__(program, seed=seed, dtype=dtype, channel_split=channel_split)
        self.in_channels, self.n_classes, self.width, self.depth = in_channels, n_classes, width, depth

    def check_input(self, x):
        x = super().check_input(x)
        n, c, h, w = x.shape
        size = 2**self.depth
        if c != self.in_channels or h % size or w % size:
            raise ValueError(
                f"x must be (N, {self.in_channels}, H, W) with H and W multiples of 2**depth = {size} "
                f"(the U-Net of depth {self.depth} pools {self.depth} times and its skip connections "
                f"need every pooled size exact), got shape {x.shape}"
            )
        return x
