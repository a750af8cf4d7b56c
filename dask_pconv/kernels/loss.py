"""Softmax cross-entropy on one block of whole rows (every class in the block)."""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant


@layout_invariant
def log_softmax(z):
    """``log softmax`` over axis 1 of ``z`` ((N, K) rows, or (N, K, H, W) per-pixel logits),
    shifted by the max over the classes for stability."""
    xp = array_namespace(z)
    s = z - z.max(axis=1, keepdims=True)
    return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))


@layout_invariant
def cross_entropy_sum(z, onehot):
    """``(1,)``: the sum over the block's rows (or pixels) of ``-log softmax(z)[t]``,
    ``onehot`` the labels one-hot along axis 1.  Summed here, in one order for every layout of
    the block (a plain sum of an F-ordered block adds in another order)."""
    return -(log_softmax(z) * onehot).sum().reshape((1,))
