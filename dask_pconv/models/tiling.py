"""Independent tiles: which window of the input each output tile of a network reads, so that a
tile runs the whole network on its window alone (a pure pass over the program, no Dask).

In evaluation mode a network without whole-image statistics computes each output pixel from
a bounded window of the input, its receptive field.  An output tile ``[o0, o1)`` (per axis)
therefore equals the network run on an input window ``[a, b)`` that holds the tile's receptive
field, cropped, provided that

- every padding the window's run adds at a window edge inside the image (a *false* edge,
  where the window's run pads with zeros what the image holds) lies outside what the tile
  reads, layer by layer: checked by propagating the tile's range back through every node;
- the window starts on the network's alignment ``F`` (per axis): every strided layer sees the
  window start on a multiple of its stride, so the window's pooling grid is the image's
  (``F`` is the least common multiple of what every node's scale requires);
- the window's length is a multiple of ``F`` or runs to the image's end, so that every node's
  length is the image's shifted by a multiple of its stride (additions and concatenations meet
  inputs of one length wherever the whole image does).

At the image's true edges the window's padding is the image's own, so the result is the
unsplit network's, to rounding.  Each layer declares its geometry with
:meth:`~dask_pconv.models.layers.Layer.reach`; a layer whose output reads its whole input
(a global pooling, Flatten, Linear) cannot run on tiles and is refused, naming the node.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

from .program import INPUT

__all__ = ["AxisTiles", "TilePlan", "grow_window", "plan_tiles"]


class AxisTiles(NamedTuple):
    """The tiles of one spatial axis.

    ``outputs[t] = (o0, o1)`` is tile ``t``'s output range (the ranges cover the output in
    order), ``windows[t] = (a, b)`` the input window its run reads, and ``crops[t] = (c0, c1)``
    the tile inside that run's output.
    """

    outputs: tuple
    windows: tuple
    crops: tuple


class TilePlan(NamedTuple):
    """Per-axis tiles (``rows``, ``cols``), each axis's alignment ``align = (Fh, Fw)``, the
    output size ``out_hw`` and the output's scale per input pixel ``scale`` (``(Fraction,
    Fraction)``)."""

    rows: AxisTiles
    cols: AxisTiles
    align: tuple
    out_hw: tuple
    scale: tuple

    @property
    def n_tiles(self):
        return len(self.rows.outputs) * len(self.cols.outputs)

    def largest_window(self):
        """The largest window's ``(height, width)`` (what the working set of a tile follows)."""
        return tuple(max(b - a for a, b in axis.windows) for axis in (self.rows, self.cols))


def _nodes(program, until):
    """The nodes the output (``until``'s, or the last node's) depends on, in program order, as
    ``(name, inputs, (rh, rw))``; ``ValueError`` naming a node that reads its whole input."""
    out = program.nodes[-1].name if until is None else program.node(until).name
    wanted, order = {out}, []
    for node in reversed(program.nodes):
        if node.name in wanted:
            wanted.update(node.inputs)
            order.append(node)
    nodes = []
    for node in reversed(order):
        reach = node.layer.reach()
        if reach is None:
            raise ValueError(
                f"node {node.name!r} ({type(node.layer).__name__}) reads its whole input: a tile "
                "cannot run it on a window of the image"
            )
        nodes.append((node.name, node.inputs, reach))
    return nodes, out


def _scales(nodes, axis):
    """Each node's length per input pixel (a Fraction), and the alignment ``F``."""
    scale, align = {INPUT: Fraction(1)}, 1
    for name, inputs, reach in nodes:
        ins = {scale[i] for i in inputs}
        if len(ins) != 1:
            raise ValueError(f"node {name!r} reads inputs of different scales {sorted(map(str, ins))}")
        (s_in,) = ins
        r = reach[axis]
        if r.kind == "window":
            align = math.lcm(align, (s_in / r.stride).denominator)
        scale[name] = s_in * r.scale
        align = math.lcm(align, s_in.denominator, scale[name].denominator)
    return scale, align


def _lengths(nodes, axis, n):
    """Each node's length for an input of length ``n``, or None if a node would be empty or
    meet inputs of different lengths."""
    length = {INPUT: n}
    for name, inputs, reach in nodes:
        ins = {length[i] for i in inputs}
        if len(ins) != 1:
            return None
        (m,) = ins
        length[name] = reach[axis].length(m)
        if length[name] < 1:
            return None
    return length


def _needs(nodes, axis, out, o0, o1):
    """The range ``[lo, hi)`` of every node (and the input) that outputs ``[o0, o1)`` of node
    ``out`` read, back through the program (a node read by several takes the union)."""
    need = {out: (o0, o1)}
    for name, inputs, reach in reversed(nodes):
        if name not in need:
            continue
        lo, hi = reach[axis].needs(*need[name])
        for i in inputs:
            need[i] = (min(lo, need[i][0]), max(hi, need[i][1])) if i in need else (lo, hi)
    return need


def _window_ok(nodes, axis, out, scale_out, length, a, b, o0, o1):
    """Whether the run on window ``[a, b)`` of an input of length ``length`` computes outputs
    ``[o0, o1)`` exactly: ``(left_ok, right_ok)``."""
    lw = _lengths(nodes, axis, b - a)
    if lw is None:
        return False, False
    off = int(a * scale_out)
    if not (0 <= o0 - off and o1 - off <= lw[out]):
        return False, False
    left = right = True
    for name, (lo, hi) in _needs(nodes, axis, out, o0 - off, o1 - off).items():
        left &= a == 0 or lo >= 0
        right &= b == length or hi <= lw[name]
    return left, right


def grow_window(exact, a, b, length, align, what):
    """The window ``[a, b)`` grown by ``align`` on the side(s) ``exact(a, b)`` (``(left_ok,
    right_ok)``) says are spoilt, until both are exact; at the axis's end a side can grow no
    more and the other grows instead.  ``what`` names what the window computes, for the error
    if even the whole axis does not."""
    while True:
        left, right = exact(a, b)
        if left and right:
            return a, b
        if a == 0 and b == length:
            raise AssertionError(f"the whole axis does not compute {what}")
        if not left or b == length:
            a = max(0, a - align)
        if not right or a == 0:
            b = min(length, b + align)


def _plan_axis(nodes, axis, out, length, tile):
    scale, align = _scales(nodes, axis)
    full = _lengths(nodes, axis, length)
    if full is None:
        raise ValueError(f"an image {length} pixels long on axis {axis + 2} is too small for the network")
    n_out = full[out]
    step = max(1, int(tile * scale[out]))
    outputs, windows, crops = [], [], []
    for o0 in range(0, n_out, step):
        o1 = min(o0 + step, n_out)
        r0, r1 = _needs(nodes, axis, out, o0, o1)[INPUT]
        a = max(0, r0 // align * align)
        b = min(length, a + -(-(r1 - a) // align) * align)
        a, b = grow_window(
            lambda a, b, o0=o0, o1=o1: _window_ok(nodes, axis, out, scale[out], length, a, b, o0, o1),
            a,
            b,
            length,
            align,
            f"outputs [{o0}, {o1}) of node {out!r}",
        )
        off = int(a * scale[out])
        outputs.append((o0, o1))
        windows.append((a, b))
        crops.append((o0 - off, o1 - off))
    return AxisTiles(tuple(outputs), tuple(windows), tuple(crops)), align, n_out, scale[out]


def plan_tiles(program, image_hw, tile, until=None):
    """The independent tiles of ``program`` (evaluation mode) over an image of ``image_hw``.

    Parameters
    ----------
    program : Program
    image_hw : (int, int)
        The input image's height and width.
    tile : (int, int)
        Tile height and width in input pixels; output tiles are ``tile * scale`` (at least
        1) output pixels, where ``scale`` is the network's output length per input pixel.
    until : str, optional
        Plan the output of this node (feature extraction) instead of the last node's.

    Returns
    -------
    TilePlan

    Raises
    ------
    ValueError
        A node reads its whole input (names it), reads inputs of different scales, or the
        image is too small for the network.
    """
    nodes, out = _nodes(program, until)
    axes = [_plan_axis(nodes, a, out, image_hw[a], tile[a]) for a in (0, 1)]
    return TilePlan(
        axes[0][0],
        axes[1][0],
        (axes[0][1], axes[1][1]),
        (axes[0][2], axes[1][2]),
        (axes[0][3], axes[1][3]),
    )
