"""A trainable model: a :class:`~dask_pconv.models.program.Program`, its parameters and state,
and the calls a user and the training loop make (forward, forward-backward, predict,
features), all through the program's one interpreter."""

from __future__ import annotations

from collections.abc import Mapping

import dask
import dask.array as da
import numpy as np

from .. import autodiff as ad
from ..backend import on_device_of, to_dask_array
from ..geometry import even_chunks
from .layers import RunMode
from .program import Program

__all__ = ["Model"]


class Model:
    """Parameters and state of a :class:`Program`, trained and run as Dask graphs.

    Parameters
    ----------
    program : Program
    seed : int
        Seeds the initial weights (:meth:`Program.init`).
    dtype : numpy dtype
        float32 (default) or float64.
    channel_split : int
        Default number of chunks of every parameter's output channels (axis 0; model
        parallelism, ChainerMN's layout but exact); 1 keeps them whole.  Layers that declare
        ``channel_split=False`` (a network's last layer) stay whole.  :meth:`dask_params`,
        :meth:`chunked` and the forward calls take another value per call.
    input_shape : tuple, optional
        ``(C, H, W)`` every input must have (``ValueError`` otherwise); None checks only that
        the input is 4-D.

    Attributes
    ----------
    params : dict
        Trainable parameters, name -> array, in program order, PyTorch layouts.
    state : dict
        Running statistics (BatchNorm ``*.avg_mean``/``*.avg_var``, or the names a program's
        nodes give them), apart from ``params``.
    """

    def __init__(self, program, seed=0, dtype=np.float32, channel_split=1, input_shape=None):
        if not isinstance(program, Program):
            raise TypeError(f"program must be a Program, got {type(program).__name__}")
        self.program, self.seed = program, seed
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise TypeError(f"dtype must be a floating dtype (float32 or float64), got {self.dtype}")
        self.channel_split = _check_split(channel_split)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.params, self.state = program.init(seed, self.dtype)
        self._specs = {**program.param_specs(), **program.state_specs()}

    # -- parameters ------------------------------------------------------------------------
    @property
    def n_params(self):
        return int(sum(np.prod(v.shape) for v in self.params.values()))

    def load_params(self, mapping, state=None):
        """Replace the parameters (and optionally the state) from a mapping.

        Names and shapes must match exactly (``KeyError``/``ValueError`` otherwise); values must
        be real numbers (``TypeError``) and, for NumPy values, finite (``ValueError``: training
        never starts from NaN or Inf), and NumPy BatchNorm running variances (the state arrays
        whose spec says ``nonnegative``) must be >= 0.  Dask (and device) values are taken as
        they are, not checked for finiteness or sign (that would compute them or copy them to
        the host).  Every value is cast to the model's dtype.  Nothing is replaced unless
        everything checks out.
        """
        checked = [
            (target, _checked(target, new, what, self.dtype, self._specs))
            for target, new, what in ((self.params, mapping, "params"), (self.state, state, "state"))
            if new is not None
        ]
        for target, values in checked:
            target.update(values)

    def chunked(self, arrays, like=None, channel_split=None):
        """``arrays`` (name -> array, keyed like :attr:`params` or :attr:`state`: parameters,
        optimizer velocities, running statistics) as Dask arrays chunked for a channel split.

        Axis 0 of every array whose layer allows it is cut into ``channel_split`` (default
        :attr:`channel_split`) near-equal chunks; other axes stay whole.  With ``like`` (the
        input batch, a Dask array) whose blocks are CuPy arrays, NumPy values get a task per
        chunk that copies them to the device; values already there (the persisted result of a
        training step) are used as they are, so they move to the device once.  Dask values
        already chunked so are returned as they are.
        """
        split = self.channel_split if channel_split is None else _check_split(channel_split)
        return {k: self._chunk(k, v, like, split) for k, v in arrays.items()}

    def _chunk(self, name, value, like, split):
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not a parameter or state array of this model")
        n = value.shape[0]
        lead = even_chunks(n, min(split, n)) if spec.channel_split and split > 1 else (n,)
        chunks = (lead,) + tuple((s,) for s in value.shape[1:])
        if isinstance(value, da.Array):
            value = value if value.chunks == chunks else value.rechunk(chunks)
        else:
            value = da.from_array(value, chunks=chunks, name=False, asarray=False)
        return value if like is None else on_device_of(value, like)

    def dask_params(self, like=None, channel_split=None):
        """The parameters as Dask arrays chunked for a channel split (:meth:`chunked`)."""
        return self.chunked(self.params, like, channel_split)

    # -- running the program ---------------------------------------------------------------
    def check_input(self, x):
        """``x`` as a Dask array of the model's dtype, or ``ValueError`` if the model cannot
        take its shape (4-D, and ``input_shape`` where set; a subclass may check more).  Every
        forward call and training step checks its batch with this."""
        x = to_dask_array(x, x.shape)
        if x.ndim != 4 or (self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape):
            want = ", ".join(map(str, self.input_shape or ("C", "H", "W")))
            raise ValueError(f"x must be (N, {want}), got shape {x.shape}")
        return x.astype(self.dtype, copy=False)

    def forward(self, x, train=True, dropout=True, step=0, params=None, state=None, channel_split=None):
        """Logits (a :class:`~dask_pconv.autodiff.Tensor`) and the lazily updated state
        (training mode) or an empty dict (evaluation).

        ``params`` (name -> tensor or Dask array) and ``state`` (name -> array) replace the
        model's own; ``channel_split`` chunks the model's own parameters (:meth:`chunked`)."""
        x = self.check_input(x)
        if params is None:
            params = self._tensors(self.dask_params(x, channel_split))
        state = self.state if state is None else state
        mode = RunMode(train=train, dropout=dropout, seed=self.seed, step=step)
        z, new_state = self.program.run(ad.Tensor(x), params, state, mode)
        return z, (new_state if train else {})

    @staticmethod
    def _tensors(params):
        """Parameters as tape leaves, named like the parameters."""
        return {k: ad.Tensor(v, name=k) for k, v in params.items()}

    def forward_backward_aux(
        self, x, t, train=True, dropout=True, step=0, params=None, state=None, channel_split=None
    ):
        """``(loss, grads, aux)``: like :meth:`forward_backward` plus ``aux['accuracy']``
        (lazy scalar), ``aux['state']`` (updated running statistics) and ``aux['logits']``.

        ``params`` (name -> Dask array, as from :meth:`dask_params`) replaces the model's own,
        so that an optimizer update built from the same arrays shares their graph keys (and a
        parameter copied to the device is copied once); ``state`` likewise replaces the
        running statistics."""
        x = self.check_input(x)
        p = self._tensors(self.dask_params(x, channel_split) if params is None else params)
        z, state = self.forward(x, train=train, dropout=dropout, step=step, params=p, state=state)
        zc = z.value.chunks
        labels = (zc[0],) + zc[2:]  # (N,) rows, or (N, H, W) pixels of a segmentation output
        t = to_dask_array(t, labels if np.ndim(t) == len(labels) else -1)
        if t.ndim == len(labels) and t.chunks != labels:
            t = t.rechunk(labels)
        loss = ad.softmax_cross_entropy(z, t)
        grads = ad.grad(loss, p)
        aux = {"accuracy": ad.accuracy(z, t), "state": state, "logits": z.value}
        return loss.value, grads, aux

    def forward_backward(self, x, t, train=True, dropout=True, step=0, channel_split=None):
        """Lazy loss and gradients for a batch.

        Parameters
        ----------
        x : dask.array.Array, shape (N, C, H, W)
            Any chunking: batch, channel, spatial or a mix.  NumPy arrays are wrapped.
        t : array of int, shape (N,)
            Labels.
        train : bool
            BatchNorm uses batch statistics (True) or the running ones (False).
        dropout : bool
            Apply dropout (only when ``train``); masks come from ``(seed, step, layer)``.
        step : int
            Training step, for the dropout masks.
        channel_split : int, optional
            Chunks of the parameters' output channels (default :attr:`channel_split`).

        Returns
        -------
        loss : dask.array.Array
            Mean softmax cross-entropy, a 0-d array.
        grads : dict
            Name -> Dask array, keyed and shaped like :attr:`params`.
        """
        if train:
            staged = self._staged_gradients(x, t, dropout, step, channel_split)
            if staged is not None:
                return staged
        loss, grads, _ = self.forward_backward_aux(x, t, train, dropout, step, channel_split=channel_split)
        return loss, grads

    def _staged_gradients(self, x, t, dropout, step, channel_split):
        """``(loss, grads)`` as the training step's coarse stages without its update, or None
        where they cannot run it (:func:`dask_pconv.stages.step.unstaged`, which also reads
        ``pconv.staged``)."""
        from ..stages.step import staged_gradients, unstaged

        x = self.check_input(x)
        params = self.dask_params(x, channel_split)
        if unstaged(self, None, params, x) is not None:
            return None
        t = to_dask_array(t, (x.chunks[0],) + tuple((n,) for n in np.shape(t)[1:]))
        loss, grads, _ = staged_gradients(self, params, x, t, step, dropout)
        return loss, grads

    def predict(self, x, channel_split=None):
        """Logits in evaluation mode (running statistics, no dropout): a lazy Dask array.

        On batch chunks and spatial tiles the program runs as stages
        (:mod:`dask_pconv.stages`): one task per batch chunk, or per tile and chunk, each
        tile reading its receptive field's window (the output is then chunked like the
        plan's tiles); :meth:`explain` says how.  A channel split runs the fine-grained graph
        (the same result)."""
        x = self.check_input(x)
        y = self._staged(x, None, channel_split)
        if y is not None:
            return y
        z, _ = self.forward(x, train=False, channel_split=channel_split)
        return z.value

    def _staged(self, x, until, channel_split):
        """The staged forward (evaluation mode), or None where the plan refuses the layout or
        the config key ``pconv.staged`` is False."""
        from ..stages.lower import forward

        if not dask.config.get("pconv.staged", True):
            return None
        split = self.channel_split if channel_split is None else _check_split(channel_split)
        return forward(self, x, until, split)

    def explain(self, x, until=None, channel_split=None, mode="predict"):
        """How :meth:`predict` (or :meth:`features` with ``until``; ``mode="train"``: a
        training step or :meth:`forward_backward`) runs on ``x``: the stages of
        :func:`dask_pconv.stages.plan.plan`, one line each, and why the program is cut where it
        is (or why it is not staged)."""
        from ..stages.plan import Layout, plan

        split = self.channel_split if channel_split is None else _check_split(channel_split)
        return plan(self.program, Layout.of(to_dask_array(x, x.shape), split), mode, until).explain()

    def features(self, x, until, channel_split=None):
        """The output of node ``until`` in evaluation mode, as a lazy Dask array (no tape).

        ``x`` may have any height and width the layers up to ``until`` accept (the input
        shape check applies to the channels only), so a large image chunked into spatial
        tiles runs tile by tile, each tile on its receptive field's window (as
        :meth:`predict`).
        """
        x = to_dask_array(x, x.shape)
        channels = None if self.input_shape is None else self.input_shape[0]
        if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
            raise ValueError(f"x must be (N, {channels or 'C'}, H, W), got shape {x.shape}")
        x = x.astype(self.dtype, copy=False)
        h = self._staged(x, until, channel_split)
        if h is not None:
            return h
        params = self.dask_params(channel_split=channel_split)
        mode = RunMode(train=False, dropout=False, seed=self.seed)
        h, _ = self.program.run(x, params, self.state, mode, until=until)
        return h


def _check_split(channel_split):
    if not (isinstance(channel_split, int) and channel_split >= 1):
        raise ValueError(f"channel_split must be a positive int, got {channel_split!r}")
    return int(channel_split)


def _checked(target, new, what, dtype, specs):
    """``new`` checked against ``target`` (names, shapes, real finite values) and cast to
    ``dtype``; raises before anything is replaced."""
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
        if specs[k].nonnegative and isinstance(v, np.ndarray) and (v < 0).any():
            raise ValueError(f"{what}[{k!r}] (a BatchNorm running variance) has negative values")
        values[k] = v.astype(dtype, copy=False)  # lazy for Dask, on the device for CuPy
    return values
