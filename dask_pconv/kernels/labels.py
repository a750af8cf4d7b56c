"""Class labels on one block."""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant


@layout_invariant
def onehot(t, n_classes, dtype):
    """``(N, n_classes)`` rows of ``dtype``: 1 at each label of ``t`` (N,), 0 elsewhere."""
    xp = array_namespace(t)
    return (t[:, None] == xp.arange(n_classes)[None, :]).astype(dtype)
