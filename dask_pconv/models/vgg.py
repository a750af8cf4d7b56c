"""Chainer's CIFAR VGG16 with BatchNorm (``examples/cifar/models/VGG.py``), as a config list.

3x3 convs, pad 1, no bias, each followed by BatchNorm and ReLU: 64,64 | 128,128 | 256x3 |
512x3 | 512x3, a 2x2 max-pool after each block, dropout after each non-final conv of a block
(0.3 in block 1, 0.4 elsewhere); then dropout 0.5, Linear 512->512 (no bias), BatchNorm, ReLU,
dropout 0.5, Linear 512->n_classes (no bias).
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .. import autodiff as ad
from ..backend import on_device_of, wrap
from ..geometry import even_chunks
from ..ops import conv2d, max_pool2d
from ..ops.nn import batch_norm, batch_norm_running_update, batch_norm_stats

__all__ = ["VGG16", "VGG16_CONFIG"]

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


def _lecun_normal(rng, shape, fan_in, dtype):
    """Chainer's default initializer: N(0, 1/fan_in)."""
    return (rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)).astype(dtype)


class VGG16:
    """VGG16-BN for 32x32 images (Chainer's CIFAR example), trained as Dask graphs.

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
        self.n_classes, self.in_channels, self.width, self.seed = n_classes, in_channels, width, seed
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise TypeError(f"dtype must be a floating dtype (float32 or float64), got {self.dtype}")
        if not (isinstance(channel_split, int) and channel_split >= 1):
            raise ValueError(f"channel_split must be a positive int, got {channel_split!r}")
        self.channel_split = int(channel_split)
        rng = np.random.default_rng(seed)
        ch = lambda c: max(1, int(round(c * width)))  # noqa: E731
        self.layers = []  # (kind, name, extra)
        params, state = {}, {}
        c_in = in_channels
        for block, convs in VGG16_CONFIG:
            for i, (c, drop) in enumerate(convs, 1):
                name = f"block{block}_{i}"
                c_out = ch(c)
                params[f"{name}.conv.W"] = _lecun_normal(rng, (c_out, c_in, 3, 3), c_in * 9, self.dtype)
                params[f"{name}.bn.gamma"] = np.ones(c_out, self.dtype)
                params[f"{name}.bn.beta"] = np.zeros(c_out, self.dtype)
                state[f"{name}.bn.avg_mean"] = np.zeros(c_out, self.dtype)
                state[f"{name}.bn.avg_var"] = np.ones(c_out, self.dtype)
                self.layers.append(("block", name, None))
                if drop:
                    self.layers.append(("dropout", name, drop))
                c_in = c_out
            self.layers.append(("pool", f"pool{block}", None))
        hidden = ch(512)
        self.layers.append(("dropout", "fc1", 0.5))
        fc_in = c_in * (image_size // 32) ** 2  # 1x1 after the pools at 32x32 (the CIFAR net)
        params["fc1.W"] = _lecun_normal(rng, (hidden, fc_in), fc_in, self.dtype)
        params["bn_fc1.gamma"] = np.ones(hidden, self.dtype)
        params["bn_fc1.beta"] = np.zeros(hidden, self.dtype)
        state["bn_fc1.avg_mean"] = np.zeros(hidden, self.dtype)
        state["bn_fc1.avg_var"] = np.ones(hidden, self.dtype)
        self.layers.append(("fc_bn_relu", "fc1", None))
        self.layers.append(("dropout", "fc2", 0.5))
        params["fc2.W"] = _lecun_normal(rng, (n_classes, hidden), hidden, self.dtype)
        self.layers.append(("fc", "fc2", None))
        self.params, self.state = params, state

    # -- parameters ------------------------------------------------------------------------
    @property
    def n_params(self):
        return int(sum(np.prod(v.shape) for v in self.params.values()))

    def load_params(self, mapping, state=None):
        """Replace the parameters (and optionally the BatchNorm state) from a mapping.

        Names and shapes must match exactly (``KeyError``/``ValueError`` otherwise); values must
        be real numbers (``TypeError``) and, for NumPy values, finite (``ValueError``: training
        never starts from NaN or Inf), and NumPy BatchNorm running variances ``*.avg_var`` must
        be >= 0.  Dask (and device) values are taken as they are, not checked for finiteness or
        sign (that would compute them or copy them to the host).  Every value
        is cast to the model's dtype.  Nothing is replaced unless everything checks out.
        """
        from collections.abc import Mapping

        checked = []
        for target, new, what in ((self.params, mapping, "params"), (self.state, state, "state")):
            if new is None:
                continue
            if not isinstance(new, Mapping):
                raise TypeError(f"{what} must be a mapping of name -> array, got {type(new).__name__}")
            missing = sorted(set(target) - set(new))
            extra = sorted(set(new) - set(target))
            if missing or extra:
                raise KeyError(f"{what} names do not match: missing {missing}, unexpected {extra}")
            values = {}
            for k, v in new.items():
                if not (hasattr(v, "shape") and hasattr(v, "dtype")):  # lists etc.; Dask, CuPy kept
                    v = np.asarray(v)
                if tuple(v.shape) != tuple(target[k].shape):
                    raise ValueError(f"{what}[{k!r}] has shape {tuple(v.shape)}, expected {target[k].shape}")
                if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
                    raise TypeError(f"{what}[{k!r}] must hold real numbers, got dtype {v.dtype}")
                if isinstance(v, np.ndarray) and not np.isfinite(v).all():
                    raise ValueError(f"{what}[{k!r}] holds NaN or Inf; refusing to load it")
                if what == "state" and k.endswith(".avg_var") and isinstance(v, np.ndarray) and (v < 0).any():
                    raise ValueError(f"{what}[{k!r}] (a BatchNorm running variance) has negative values")
                values[k] = v.astype(self.dtype, copy=False)  # lazy for Dask, on the device for CuPy
            checked.append((target, values))
        for target, values in checked:
            target.update(values)

    def _out_chunks(self, n):
        s = min(self.channel_split, n)
        return even_chunks(n, s) if s > 1 else (n,)

    def _as_dask(self, name, value, like=None):
        """A parameter as a Dask array chunked for the channel split (output channels), with
        blocks of ``like``'s library if given (see :meth:`dask_params`)."""
        lead = self._out_chunks(value.shape[0])
        if name.startswith("fc2"):
            lead = (value.shape[0],)
        chunks = (lead,) + tuple((n,) for n in value.shape[1:])
        if isinstance(value, da.Array):
            value = value if value.chunks == chunks else value.rechunk(chunks)
        else:
            value = da.from_array(value, chunks=chunks, name=False, asarray=False)
        return value if like is None else on_device_of(value, like)

    def dask_params(self, like=None):
        """The parameters as Dask arrays chunked for ``channel_split``.

        With ``like`` (the input batch, a Dask array) whose blocks are CuPy arrays, NumPy
        parameters get a task per chunk that copies them to the device; parameters already
        there (the persisted result of a training step) are used as they are, so the weights
        move to the device once.
        """
        return {k: self._as_dask(k, v, like) for k, v in self.params.items()}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x, train=True, dropout=True, step=0, params=None, state=None):
        """Logits (a :class:`~dask_pconv.autodiff.Tensor` of shape (N, n_classes)) and the
        lazily updated BatchNorm state (training mode) or the current one (evaluation).
        ``state`` (running statistics, name -> array) replaces the model's own."""
        x = wrap(x, x.shape)
        p = params if params is not None else self._tensors(like=x)
        state = self.state if state is None else state
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (N, {', '.join(map(str, expected))}), got shape {x.shape}")
        h = ad.Tensor(x.astype(self.dtype, copy=False))
        new_state = {}

        def bn_relu(h, name):
            gamma, beta = p[f"{name}.gamma"], p[f"{name}.beta"]
            # the ops chunk these like h's channels themselves
            old_m, old_v = state[f"{name}.avg_mean"], state[f"{name}.avg_var"]
            if not train:
                return ad.batch_norm(h, gamma, beta, old_m, old_v, eps=BN_EPS, relu=True)
            stats = batch_norm_stats(h.value)  # the same graph keys as inside batch_norm
            new_m, new_v = batch_norm_running_update(stats, old_m, old_v, BN_DECAY)
            new_state[f"{name}.avg_mean"], new_state[f"{name}.avg_var"] = new_m, new_v
            return ad.batch_norm(h, gamma, beta, eps=BN_EPS, relu=True)

        for li, (kind, name, extra) in enumerate(self.layers):
            if kind == "block":
                h = ad.conv2d(h, p[f"{name}.conv.W"], padding=1)
                h = bn_relu(h, f"{name}.bn")
            elif kind == "pool":
                h = ad.max_pool2d(h, 2, 2)
            elif kind == "dropout":
                if train and dropout:
                    h = ad.dropout(h, extra, self.seed, step, li)
            elif kind == "fc_bn_relu":
                h = ad.flatten(h)
                h = bn_relu(ad.linear(h, p[f"{name}.W"]), "bn_fc1")
            elif kind == "fc":
                h = ad.linear(h, p[f"{name}.W"])
        state = new_state if train else {}
        return h, state

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
        if not (isinstance(blocks, int) and 1 <= blocks <= len(VGG16_CONFIG)):
            raise ValueError(f"blocks must be an int from 1 to {len(VGG16_CONFIG)}, got {blocks!r}")
        x = wrap(x, x.shape)
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 2**blocks:
            raise ValueError(
                f"x must be (N, {self.in_channels}, H, W) with H, W >= {2**blocks}, got shape {x.shape}"
            )
        p = self.dask_params()
        h = x.astype(self.dtype, copy=False)
        for kind, name, _ in self.layers:
            if kind == "block":
                h = conv2d(h, p[f"{name}.conv.W"], padding=1)
                mean, var = self.state[f"{name}.bn.avg_mean"], self.state[f"{name}.bn.avg_var"]
                gamma, beta = p[f"{name}.bn.gamma"], p[f"{name}.bn.beta"]
                h = batch_norm(h, gamma, beta, mean, var, eps=BN_EPS, relu=True)
            elif kind == "pool":
                h = max_pool2d(h, 2, 2)
                if name == f"pool{blocks}":
                    return h
        raise AssertionError("unreachable: every block ends in a pool")

    def _tensors(self, like=None, params=None):
        """The parameters (``params``, or :meth:`dask_params` for ``like``) as tape leaves."""
        params = self.dask_params(like) if params is None else params
        return {k: ad.Tensor(v, name=k) for k, v in params.items()}

    def forward_backward_aux(self, x, t, train=True, dropout=True, step=0, params=None, state=None):
        """``(loss, grads, aux)``: like :meth:`forward_backward` plus ``aux['accuracy']``
        (lazy scalar), ``aux['state']`` (updated BatchNorm statistics) and ``aux['logits']``.

        ``params`` (name -> Dask array, as from :meth:`dask_params`) replaces the model's own,
        so that an optimizer update built from the same arrays shares their graph keys (and a
        parameter copied to the device is copied once); ``state`` likewise replaces the running
        BatchNorm statistics."""
        x = wrap(x, x.shape)
        p = self._tensors(like=x, params=params)
        z, state = self.forward(x, train=train, dropout=dropout, step=step, params=p, state=state)
        t = wrap(t, (z.value.chunks[0],))
        if t.chunks[0] != z.value.chunks[0]:
            t = t.rechunk((z.value.chunks[0],))
        loss = ad.softmax_cross_entropy(z, t)
        grads = ad.grad(loss, p)
        aux = {"accuracy": ad.accuracy(z, t), "state": state, "logits": z.value}
        return loss.value, grads, aux

    def forward_backward(self, x, t, train=True, dropout=True, step=0):
        """Lazy loss and gradients for a batch.

        Parameters
        ----------
        x : dask.array.Array, shape (N, in_channels, 32, 32)
            Any chunking: batch, channel, spatial or a mix.
        t : array of int, shape (N,)
            Labels.
        train : bool
            BatchNorm uses batch statistics (True) or the running ones (False).
        dropout : bool
            Apply dropout (only when ``train``); masks come from ``(seed, step, layer)``.
        step : int
            Training step, for the dropout masks.

        Returns
        -------
        loss : dask.array.Array
            Mean softmax cross-entropy, a 0-d array.
        grads : dict
            Name -> Dask array, keyed and shaped like :attr:`params`.
        """
        loss, grads, _ = self.forward_backward_aux(x, t, train, dropout, step)
        return loss, grads

    def predict(self, x):
        """Logits in evaluation mode (running BatchNorm statistics, no dropout): lazy (N, K)."""
        z, _ = self.forward(x, train=False)
        return z.value
