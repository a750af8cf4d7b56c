"""The stage planner: where a program's blocks must exchange something, and so where its
stages begin (a pure pass over the program and the layout: no graph is built, nothing computed).

A *block* is one piece of the input's layout: a batch chunk, a spatial tile, or both.  Each
layer declares what it needs across the blocks of each split axis
(:meth:`~dask_pconv.models.layers.Layer.needs`): nothing (local), a halo, a statistic over every
block, a gather of every block, or a partial sum.  Between two such points every block runs
its nodes alone, as one task per block: a *stage*.

- On batch chunks in evaluation mode every layer kind is local: the whole program is one
  stage, one task per chunk.
- On spatial tiles a halo does not cut: the stage's tiles read, once, the window their layers
  need together (:func:`~dask_pconv.models.tiling.plan_tiles`, communication-avoiding, the
  redundant arithmetic reported by :meth:`Plan.explain`).  A layer that needs every tile (a
  global pooling, Flatten) cuts: the tiles of the stage before are put together, and the rest
  of the program runs on whole images of each batch chunk.  The tiled stage must end in a
  node that is the only value the rest reads (the rest cannot read a tile's intermediate
  values); the planner picks the last such node before the cut.
- In training mode, a layer that needs a statistic over the whole batch (a BatchNorm) starts a
  stage one later than its latest input (:func:`stage_numbers`; parallel branches share their
  synchronisations): the stages the training step's graph runs (:mod:`dask_pconv.stages.step`).
  On tiles each stage's tiles read, once, the windows of the values before it that their
  layers need together (:mod:`dask_pconv.stages.train_plan`); from the stage of the first
  layer that needs every tile on, the stages run on whole images of each batch chunk.
- A channel split is not planned here yet (:attr:`Plan.refused` says so); it runs the
  fine-grained graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
from dask.utils import parse_bytes

from ..models.layers import SPLIT_AXES, BatchNorm, Need
from ..models.program import INPUT
from ..models.tiling import plan_tiles
from .train_plan import TileRegions, stage_numbers, step_plan

__all__ = [
    "MODES",
    "Layout",
    "Plan",
    "Stage",
    "nodes_upto",
    "plan",
    "read_whole",
    "read_whole_below",
    "stage_numbers",
]

#: The modes a plan is made for: ``"predict"`` (evaluation mode forward: ``predict``,
#: ``features``, evaluation, ``predict_to_zarr``) and ``"train"`` (a training step and
#: ``forward_backward``, on batch chunks).
MODES = ("predict", "train")


#: What one dependent hop costs on distributed (a scheduler round trip: 6-8 ms measured on
#: this machine kind), in bytes a worker receives from another in the same time (at about
#: 0.5 GB/s between two worker processes on one machine): the default of the config key
#: ``pconv.read-whole-below``.
READ_WHOLE_BELOW = "2 MiB"


def read_whole(nbytes, below=None):
    """Whether a block should read another block's whole stage result (``nbytes``: one hop,
    and the transfer of all of it) rather than a small piece picked out by a task of its own
    (two hops): the stage result is smaller than the config key ``pconv.read-whole-below``
    (default :data:`READ_WHOLE_BELOW`; ``0`` always picks)."""
    return nbytes < (read_whole_below() if below is None else below)


def read_whole_below():
    """The config key ``pconv.read-whole-below`` in bytes (:func:`read_whole`)."""
    return parse_bytes(str(dask.config.get("pconv.read-whole-below", READ_WHOLE_BELOW)))


@dataclass(frozen=True)
class Layout:
    """How the input is cut: ``chunks`` as a Dask array's (``(N chunks, C chunks, H chunks, W
    chunks)``) and the parameters' output channels into ``out_channel`` chunks."""

    chunks: tuple
    out_channel: int = 1

    @classmethod
    def of(cls, x, out_channel=1):
        return cls(tuple(tuple(c) for c in x.chunks), out_channel)

    def blocks(self, axis):
        """How many blocks the layout has along split ``axis``."""
        n, c, h, w = (len(a) for a in self.chunks)
        return {"batch": n, "spatial": h * w, "in_channel": c, "out_channel": self.out_channel}[axis]

    def describe(self):
        n, c, h, w = (len(a) for a in self.chunks)
        parts = [f"{n} batch chunk{'s' * (n != 1)}"]
        if h * w > 1:
            parts.append(f"{h}x{w} tiles")
        if c > 1:
            parts.append(f"{c} input-channel chunks")
        if self.out_channel > 1:
            parts.append(f"{self.out_channel} output-channel chunks")
        return " x ".join(parts)


@dataclass(frozen=True)
class Stage:
    """One stage: its ``nodes`` (``(index, node)`` pairs, program order), whether its blocks
    are ``tiles`` (else whole images of each batch chunk), ``why`` it begins where it does, and
    for tiles the window ``tiles`` (a :class:`~dask_pconv.models.tiling.TilePlan`)."""

    nodes: tuple
    tiled: bool
    why: str
    tiles: object = None

    @property
    def output(self):
        return self.nodes[-1][1].name


@dataclass(frozen=True)
class Plan:
    """The stages of a program for a layout and a mode (:func:`plan`); ``refused`` says why the
    stages cannot run it (then ``stages`` is empty)."""

    mode: str
    layout: Layout
    stages: tuple
    refused: str | None = None

    def explain(self):
        """What runs where and why the program is cut there, one line per stage."""
        head = f"{self.mode} on {self.layout.describe()}"
        if self.refused:
            return f"{head}: not staged: {self.refused}"
        lines = [f"{head}: {len(self.stages)} stage{'s' * (len(self.stages) != 1)}"]
        for k, st in enumerate(self.stages):
            names = [n.name for _, n in st.nodes]
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            where = "per tile and batch chunk" if st.tiled else "per batch chunk, on whole images"
            line = f"stage {k}: {len(names)} node{'s' * (len(names) != 1)} ({span}), {where}; {st.why}"
            if st.tiles is not None and not isinstance(st.tiles, TileRegions):
                line += f"; {_window_note(st.tiles, self.layout)}"
            lines.append(line)
        return "\n".join(lines)


def _window_note(tiles, layout):
    """The tiles' windows and the arithmetic they repeat, for :meth:`Plan.explain`."""
    image = sum(layout.chunks[2]) * sum(layout.chunks[3])
    read = sum(b - a for a, b in tiles.rows.windows) * sum(b - a for a, b in tiles.cols.windows)
    n = len(tiles.rows.outputs) * len(tiles.cols.outputs)
    return (
        f"{n} window{'s' * (n != 1)} aligned to {tiles.align[0]}x{tiles.align[1]}, reading "
        f"{read / image - 1:.0%} more input pixels than the image has (the halos' redundant work)"
    )


def _regions_note(regions, s):
    """A training stage's tiles and the arithmetic they repeat, for :meth:`Plan.explain`."""
    gi, gj = regions.grid
    return (
        f"{gi}x{gj} tiles aligned to {regions.align[0]}x{regions.align[1]}, holding "
        f"{regions.redundancy(s):.0%} more pixels of what they read than it has (the halos' redundant work)"
    )


def nodes_upto(program, until):
    """The nodes ``(index, node)`` the output (``until``'s, or the last node's) depends on."""
    nodes = list(enumerate(program.nodes))
    if until is not None:
        program.node(until)  # KeyError naming the nodes
        nodes = nodes[: next(k for k, (_, n) in enumerate(nodes) if n.name == until) + 1]
    need, keep = {nodes[-1][1].name}, []
    for i, node in reversed(nodes):
        if node.name in need:
            keep.append((i, node))
            need.update(node.inputs)
    return tuple(reversed(keep))


def _first_cut(nodes, train):
    """The position of the first node that needs more than a halo across tiles (and what it
    needs), or ``(len(nodes), None)``."""
    for k, (_, node) in enumerate(nodes):
        need = node.layer.needs("spatial", train)
        if need not in (Need.LOCAL, Need.HALO):
            return k, need
    return len(nodes), None


def _last_articulation(nodes, before):
    """The last position ``d < before`` whose node's output is the only value of
    ``nodes[:d + 1]`` (and not the input) that the nodes after ``d`` read, or None."""
    for d in range(before - 1, -1, -1):
        inside = {INPUT} | {n.name for _, n in nodes[: d + 1]}
        read = {v for _, n in nodes[d + 1 :] for v in n.inputs if v in inside}
        if read <= {nodes[d][1].name}:
            return d
    return None


def _train_plan(nodes, layout):
    """The training stages (:func:`stage_numbers`, :mod:`dask_pconv.stages.train_plan`), with
    why each begins."""
    tiles = layout.chunks[2:] if layout.blocks("spatial") > 1 else None
    try:
        steps = step_plan([n for _, n in nodes], tiles)
    except ValueError as e:
        return Plan("train", layout, (), f"the spatial tiles do not fit the network: {e}")
    _, cuts = stage_numbers(nodes, True, tiles is not None)
    stages = []
    for k, spec in enumerate(steps.specs):
        if not spec.nodes:  # stage 0 of a program that starts with a BatchNorm
            continue
        starts = [n for _, n in spec.nodes if n.name in cuts]
        if not starts:
            why = "the layers before the first that needs the whole batch"
        else:
            why = "cut before " + ", ".join(
                f"{n.name!r} ({type(n.layer).__name__}: a {cuts[n.name].value} over the whole "
                f"{'batch' if isinstance(n.layer, BatchNorm) else 'image, so whole images from here on'})"
                for n in starts
            )
        if spec.tiled:
            why += f"; {_regions_note(steps.regions, k)}"
        stages.append(Stage(spec.nodes, spec.tiled, why, steps.regions if spec.tiled else None))
    return Plan("train", layout, tuple(stages))


def _refusal(nodes, layout, mode):
    if mode not in MODES:
        return f"mode {mode!r} is not planned (the modes are {MODES})"
    train = mode != "predict"
    for axis in ("in_channel", "out_channel"):
        if layout.blocks(axis) > 1:
            return f"a split of the {axis.replace('_', ' ')}s is not staged yet"
    for _, node in nodes:
        for axis in SPLIT_AXES:
            node.layer.needs(axis, train)  # a layer that declares nothing: NotImplementedError
    return None


def plan(program, layout, mode="predict", until=None):
    """The stages of ``program`` (up to node ``until``) on ``layout`` in ``mode``: a
    :class:`Plan` (see the module docstring).

    Raises ``NotImplementedError`` naming a layer kind that declares no needs, ``KeyError``
    for an unknown ``until``, and ``ValueError`` for an image too small for the network."""
    nodes = nodes_upto(program, until)
    refused = _refusal(nodes, layout, mode)
    if refused:
        return Plan(mode, layout, (), refused)
    if mode == "train":
        return _train_plan(nodes, layout)
    if layout.blocks("spatial") == 1:
        why = "every layer is local to a batch chunk in evaluation mode"
        return Plan(mode, layout, (Stage(nodes, False, why),))
    cut, need = _first_cut(nodes, train=False)
    d = _last_articulation(nodes, cut) if cut < len(nodes) else len(nodes) - 1
    if d is None:
        node = nodes[cut][1]
        why = f"node {node.name!r} ({type(node.layer).__name__}) needs a {need.value} across tiles"
        why += " and no node before it is the only value the rest reads: the tiles are put together first"
        return Plan(mode, layout, (Stage(nodes, False, why),))
    image_hw = (sum(layout.chunks[2]), sum(layout.chunks[3]))
    tile = (max(layout.chunks[2]), max(layout.chunks[3]))
    tiles = plan_tiles(program, image_hw, tile, until=nodes[d][1].name)
    first = Stage(nodes[: d + 1], True, "convolutions and pools read their halos in one window", tiles)
    if d == len(nodes) - 1:
        return Plan(mode, layout, (first,))
    node = nodes[cut][1]
    why = f"cut before node {node.name!r} ({type(node.layer).__name__}): it needs a {need.value} across tiles"
    if nodes[d + 1][1].name != node.name:
        why += f", and node {nodes[d][1].name!r} is the last value before it that the rest reads alone"
    return Plan(mode, layout, (first, Stage(nodes[d + 1 :], False, why)))
