"""Momentum SGD with weight decay (Chainer's ``MomentumSGD`` + ``WeightDecay`` hook), as
graph operations: the update is lazy and joins the training step's graph."""

from __future__ import annotations

import dask.array as da
from dask.base import tokenize

from .backend import on_device_of, to_dask_array

__all__ = ["MomentumSGD", "apply_velocity", "velocity"]


class MomentumSGD:
    """``g += weight_decay * p;  v = momentum * v - lr * g;  p += v`` for every parameter.

    Parameters
    ----------
    lr : float
        Learning rate (Chainer's CIFAR example: 0.05).
    momentum : float
        0.9 in the example.
    weight_decay : float
        5e-4 in the example; applied to every parameter, as Chainer's hook does.
    """

    def __init__(self, lr=0.05, momentum=0.9, weight_decay=5e-4):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)

    def init_state(self, params):
        """Zero velocities shaped and chunked like ``params`` (name -> array).

        Each has keys of its own: ``zeros_like`` names its result by shape, dtype and chunks
        only, so parameters of one shape shared one set of keys, and the first training step's
        graph had fewer tasks than the others."""
        return {
            k: da.zeros_like(v, name=f"sgd-velocity-init-{tokenize(k, v)}")
            if isinstance(v, da.Array)
            else da.zeros(v.shape, v.dtype, name=f"sgd-velocity-init-{tokenize(k, v)}")
            for k, v in params.items()
        }

    def update(self, params, grads, velocities):
        """Lazy ``(new_params, new_velocities)``; chunks follow the parameters.

        Parameters and velocities held as NumPy arrays meet CuPy gradients on the device
        (copied there in the graph), so the new ones live on the device."""
        new_p, new_v = {}, {}
        for k, p in params.items():
            g = grads[k]
            if g is None:
                raise ValueError(f"no gradient for parameter {k!r}")
            p = to_dask_array(p, g.chunks)
            g = g.astype(p.dtype, copy=False)
            if g.chunks != p.chunks:
                g = g.rechunk(p.chunks)
            v = velocities[k]
            v = to_dask_array(v, p.chunks)
            if v.chunks != p.chunks:
                v = v.rechunk(p.chunks)
            p, v = on_device_of(p, g), on_device_of(v, g)
            tok = tokenize(p, g, v, self.lr, self.momentum, self.weight_decay)
            # one task per chunk for each of v and p, named for the dashboard and profiles
            new_v[k] = da.map_blocks(
                velocity,
                v,
                g,
                p,
                self.momentum,
                self.lr,
                self.weight_decay,
                dtype=p.dtype,
                meta=p._meta,
                name=f"sgd-velocity-{tok}",
            )
            new_p[k] = da.map_blocks(
                apply_velocity, p, new_v[k], dtype=p.dtype, meta=p._meta, name=f"sgd-update-{tok}"
            )
        return new_p, new_v


def velocity(v, g, p, momentum, lr, weight_decay):
    """One block's new velocity: ``momentum * v - lr * (g + weight_decay * p)``, in ``p``'s
    dtype (``g`` is cast to it first)."""
    dt = p.dtype
    g = g.astype(dt, copy=False)
    return (momentum * v - lr * (g + weight_decay * p)).astype(dt, copy=False)


def apply_velocity(p, v):
    """One block's parameter after the step: ``p + v``, ``v`` its new :func:`velocity`."""
    return p + v
