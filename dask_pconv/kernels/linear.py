"""Fully connected layers on one block: ``x`` (N, in), ``W`` (out, in) in PyTorch's layout."""

from __future__ import annotations

from ._namespace import layout_invariant


@layout_invariant
def linear_forward(x, W):
    """``x @ W.T``: ``(N, out)``."""
    return x @ W.T


@layout_invariant
def linear_grad_x(g, W):
    """``g @ W`` for ``g`` (N, out): ``(N, in)``."""
    return g @ W


@layout_invariant
def linear_grad_w(g, x):
    """``g.T @ x``: ``(out, in)``."""
    return g.T @ x
