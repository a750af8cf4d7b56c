"""Chainer's CIFAR VGG16 with BatchNorm (``examples/cifar/models/VGG.py``), as a config list.

3x3 convs, pad 1, no bias, each followed by BatchNorm and ReLU: 64,64 | 128,128 | 256x3 |
512x3 | 512x3, a 2x2 max-pool after each block, dropout after each non-final conv of a block
(0.3 in block 1, 0.4 elsewhere); then dropout 0.5, Linear 512->512 (no bias), BatchNorm, ReLU,
dropout 0.5, Linear 512->n_classes (no bias).
"""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d
from .model import Model
from .program import sequential

__all__ = ["VGG16", "VGG16_CONFIG", "vgg16_program"]

#: (block, [(out_channels, dropout after this conv or None), ...]); a 2x2 pool ends each block
VGG16_CONFIG = (
    (1, ((64, 0.3), (64, None))),
    (2, ((128, 0.4), (128, None))),
    (3, ((256, 0.4), (256, 0.4), (256, None))),
    (4, ((512, 0.4), (512, 0.4), (512, None))),
    (5, ((512, 0.4), (512, 0.4), (512, None))),
)
BN_EPS = 2e-5  # Chainer's BatchNormalization default
BN_DECAY = 0.9


def vgg16_program(n_classes=10, in_channels=3, width=1.0, image_size=32, config=VGG16_CONFIG):
    """The VGG16-BN network as a :class:`~dask_pconv.models.program.Program`.

    Node names give the parameter names: ``blockB_I.conv`` (``.W``), ``blockB_I.bn``
    (``.gamma``, ``.beta``, state ``.avg_mean``, ``.avg_var``), ``fc1`` (``.W``), ``bn_fc1``,
    ``fc2``; ``blockB_I.dropout``, ``poolB``, ``flatten``, ``fc1.dropout`` and ``fc2.dropout``
    have none.  ``width`` scales every channel count (at least 1 each).
    """
    ch = lambda c: max(1, int(round(c * width)))  # noqa: E731
    bn = lambda c: BatchNorm(c, eps=BN_EPS, decay=BN_DECAY, relu=True)  # noqa: E731
    nodes, c_in = [], in_channels
    for block, convs in config:
        for i, (c, drop) in enumerate(convs, 1):
            name, c_out = f"block{block}_{i}", ch(c)
            nodes += [(f"{name}.conv", Conv2d(c_in, c_out, 3, padding=1)), (f"{name}.bn", bn(c_out))]
            if drop:
                nodes.append((f"{name}.dropout", Dropout(drop)))
            c_in = c_out
        nodes.append((f"pool{block}", MaxPool2d(2, 2)))
    hidden = ch(512)
    fc_in = c_in * (image_size // 2 ** len(config)) ** 2  # 1x1 after the pools at 32x32 (CIFAR)
    nodes += [
        ("flatten", Flatten()),
        ("fc1.dropout", Dropout(0.5)),
        ("fc1", Linear(fc_in, hidden)),
        ("bn_fc1", bn(hidden)),
        ("fc2.dropout", Dropout(0.5)),
        ("fc2", Linear(hidden, n_classes, channel_split=False)),  # the logits stay whole
    ]
    return sequential(*nodes)


class VGG16(Model):
    """VGG16-BN for 32x32 images (Chainer's CIFAR example), trained as Dask graphs: the
    :class:`~dask_pconv.models.Model` of :func:`vgg16_program`.

    Parameters
    ----------
    n_classes : int
    in_channels : int
    width : float
        Scales every channel count (0.25 for quick CPU runs); at least 1 channel each.
    seed : int
        Seeds the initial weights (Chainer's LeCun normal; BatchNorm gamma 1, beta 0).
    dtype : numpy dtype
        float32 (default) or float64.
    channel_split : int
        Split every conv's and fc1's output channels into this many chunks (model
        parallelism, ChainerMN's layout but exact).  1 keeps them whole.
    image_size : int
        Input height and width, a multiple of 32 (32 for CIFAR; fc1 takes the flattened
        ``(image_size/32)**2`` positions of the last block).

    Attributes
    ----------
    params : dict
        Trainable parameters, name -> array, in forward order, PyTorch layouts: conv
        ``blockB_I.conv.W`` (O, C, 3, 3), BatchNorm ``*.gamma``/``*.beta`` (C,), linear
        ``fc1.W`` (512, 512) and ``fc2.W`` (n_classes, 512) as (out, in).
    state : dict
        BatchNorm running statistics ``*.avg_mean``/``*.avg_var``, kept apart from ``params``.
    program : Program
        The network, node by node.
    """

    def __init__(
        self, n_classes=10, in_channels=3, width=1.0, seed=0, dtype=np.float32, channel_split=1, image_size=32
    ):
        if not (isinstance(n_classes, int) and n_classes >= 2):
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        if not (isinstance(image_size, int) and image_size >= 32 and image_size % 32 == 0):
            raise ValueError(f"image_size must be a multiple of 32 (five 2x2 pools), got {image_size!r}")
        self.image_size = image_size
        self.n_classes, self.in_channels, self.width = n_classes, in_channels, width
        super().__init__(
            vgg16_program(n_classes, in_channels, width, image_size),
            seed=seed,
            dtype=dtype,
            channel_split=channel_split,
            input_shape=(in_channels, image_size, image_size),
        )

    def features(self, x, blocks=5):
        """The convolutional feature stack in evaluation mode, as a lazy Dask array.

        The 3x3 convs (pad 1), BatchNorm with the running statistics and ReLU, and the 2x2
        max-pools of the first ``blocks`` blocks (no dropout, no tape): what :meth:`predict`
        computes before ``fc1``, for images of any size, so a large image chunked into
        spatial tiles runs layer by layer tile by tile with halos.

        Parameters
        ----------
        x : array, shape (N, in_channels, H, W)
            Any chunking; ``H, W >= 2**blocks``.  NumPy arrays are wrapped.
        blocks : int
            1 to 5.

        Returns
        -------
        dask.array.Array, shape (N, C_b, H_b, W_b)
            ``C_b`` the channels of block ``blocks``; ``H_b = floor(H / 2**blocks)`` (each pool
            floors) and likewise ``W_b``.
        """
        until = self.feature_node(blocks)
        if getattr(x, "ndim", None) == 4 and min(x.shape[2:]) < 2**blocks:
            raise ValueError(
                f"x must be (N, {self.in_channels}, H, W) with H, W >= {2**blocks}, got shape {x.shape}"
            )
        return super().features(x, until=until)

    def feature_node(self, blocks=5):
        """The node whose output is the feature stack of the first ``blocks`` blocks (1 to 5):
        ``"pool<blocks>"``."""
        if not (isinstance(blocks, int) and 1 <= blocks <= len(VGG16_CONFIG)):
            raise ValueError(f"blocks must be an int from 1 to {len(VGG16_CONFIG)}, got {blocks!r}")
        return f"pool{blocks}"
