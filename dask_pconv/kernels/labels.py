"""Class labels on one block."""

from __future__ import annotations

from ..backend import array_namespace
from ._namespace import layout_invariant


@layout_invariant
def onehot(t, n_classes, dtype):
    """``(N, n_classes)`` rows of ``dtype``: 1 at each label of ``t`` (N,), 0 elsewhere; for
    per-pixel labels ``t`` (N, H, W), ``(N, n_classes, H, W)`` (the classes on axis 1, as the
    logits of a segmentation network)."""
    xp = array_namespace(t)
    classes = xp.arange(n_classes).reshape((1, n_classes) + (1,) * (t.ndim - 1))
    return (t[:, None] == classes).astype(dtype)
