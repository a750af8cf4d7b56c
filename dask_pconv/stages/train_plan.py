"""The training step's stages (a pure pass over the program and the layout: nothing is built or
computed): which nodes each stage runs, which values cross between stages, and on spatial tiles
which region of every value each tile computes and which window of each value it reads.

*Stages.*  Every node gets a stage number (:func:`stage_numbers`): a BatchNorm's is one more
than its latest input's (it needs every block's statistics of that input), any other node's is
its latest input's, so parallel branches share their synchronisations.  On tiles, the stage of
the first node that needs every tile (a global pooling, Flatten) and every later stage run on
whole images of each batch chunk: the tiles of the values they read are put together (the
stage's own nodes before that one run on whole images too: no extra synchronisation).

*Tiles.*  The tile boundaries are the input's chunk boundaries rounded to the nearest multiple
of the network's alignment ``F`` (:mod:`dask_pconv.models.tiling`); every value ``v`` of a tiled stage is cut
into the same tiles at its own scale: tile ``k`` *owns* ``[b_k s_v, b_{k+1} s_v)`` of it (the
last tile runs to the value's end).  A tile's stage task computes the values of its stage that
later stages read on the tile's own region, exactly, from a window of every value it reads (the
input, earlier stages' values): the window is the one the network would read for an input
window ``[a, b)`` on multiples of ``F`` (or the image's edges), grown until propagating the own
regions back through the stage's nodes reads nothing a window edge inside the image spoils
(the check of :func:`~dask_pconv.models.tiling.plan_tiles`, stopped at the stage's reads).  So
the halos a stage's layers need are read once, from the tiles' own regions of the values
before it, and no value is exchanged inside a stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.layers import BatchNorm, Need
from ..models.program import INPUT
from ..models.tiling import _lengths, _scales, grow_window

__all__ = ["StageSpec", "StepPlan", "TileRegions", "stage_numbers", "step_plan"]


@dataclass(frozen=True)
class StageSpec:
    """What one stage's tasks run: its nodes ``(index, node)`` in program order, the values of
    earlier stages they read, the values whose partial statistics it computes (a BatchNorm of a
    later stage reads them) and the values later stages read."""

    nodes: tuple
    reads: tuple
    stats_of: tuple
    carried: tuple
    tiled: bool = False

    @property
    def names(self):
        return tuple(n.name for _, n in self.nodes)


def stage_numbers(nodes, train, tiles=False):
    """Per value (the input and each node of ``nodes``, ``(index, node)`` pairs), the stage
    that computes it: a node whose layer needs more than its own chunk across the batch (a
    BatchNorm's statistics in training mode) is one stage later than its latest input, any
    other node in its latest input's stage.  With ``tiles``, the stage of the first node that
    needs every tile (a global pooling, Flatten) runs on whole images, and so does every later
    stage: no node after that one is in an earlier stage.  Returns ``(stage by name, need by
    the name of each node that starts a stage or, on tiles, the whole images)``."""
    stage, cuts, whole = {INPUT: 0}, {}, None
    for _, node in nodes:
        s = max(stage[i] for i in node.inputs)
        need = node.layer.needs("batch", train)
        if need is not Need.LOCAL:
            s += 1
            cuts[node.name] = need
        elif tiles and whole is None and node.layer.needs("spatial", train) in (Need.GATHER, Need.STATISTIC):
            whole = s
            cuts[node.name] = node.layer.needs("spatial", train)
        stage[node.name] = s if whole is None else max(s, whole)
    return stage, cuts


def _first_whole(nodes, stage, cuts):
    """The first stage on whole images of a tiled step (its first node needs every tile)."""
    for node in nodes:
        if node.name in cuts and not isinstance(node.layer, BatchNorm):
            return stage[node.name]
    return None


class StepPlan:
    """The stages of a training step (see the module docstring) and who reads what across
    them.  ``regions`` is a :class:`TileRegions` on tiles, else None."""

    def __init__(self, nodes, chunks_hw=None):
        self.nodes = tuple(nodes)
        self.position = {INPUT: -1, **{n.name: i for i, n in enumerate(nodes)}}
        tiles = chunks_hw is not None and any(len(c) > 1 for c in chunks_hw)
        stage, cuts = stage_numbers(tuple(enumerate(nodes)), True, tiles)
        self.whole = _first_whole(nodes, stage, cuts) if tiles else None
        self.stage, self.last = stage, stage[nodes[-1].name]
        self.readers = {name: [n for n in nodes if name in n.inputs] for name in stage}
        self.specs = []
        for s in range(self.last + 1):
            members = tuple((i, n) for i, n in enumerate(nodes) if stage[n.name] == s)
            names = [INPUT] * (s == 0) + [n.name for _, n in members]
            reads = {i for _, n in members for i in n.inputs if stage[i] < s} | ({INPUT} if s == 0 else set())
            bn_read = [v for v in names if any(isinstance(r.layer, BatchNorm) for r in self.readers[v])]
            later = [v for v in names if v != INPUT and any(stage[r.name] > s for r in self.readers[v])]
            tiled = tiles and (self.whole is None or s < self.whole)
            self.specs.append(
                StageSpec(members, tuple(sorted(reads, key=self.order)), tuple(bn_read), tuple(later), tiled)
            )
        self.regions = TileRegions(self, chunks_hw) if tiles else None

    def order(self, name):
        return self.position[name]

    def unreached(self):
        """Nodes whose output does not reach the program's output (no gradient flows there)."""
        reach, todo = set(), [self.nodes[-1].name]
        by_name = {n.name: n for n in self.nodes}
        while todo:
            name = todo.pop()
            if name not in reach and name != INPUT:
                reach.add(name)
                todo.extend(by_name[name].inputs)
        return [n.name for n in self.nodes if n.name not in reach]

    def finishes(self, s):
        """The BatchNorms whose input stage ``s`` produced: the backward task of stage ``s``
        finishes their backward (every block's sums are known by then)."""
        return tuple(
            n
            for n in self.nodes
            if isinstance(n.layer, BatchNorm) and n.inputs[0] != INPUT and self.stage[n.inputs[0]] == s
        )

    def contributors(self, s):
        """``(value, stage)`` pairs: the later stages whose nodes (not BatchNorms) read a value of
        stage ``s``, in stage order; their backward tasks hand back a gradient contribution."""
        out = []
        for later in range(s + 1, self.last + 1):
            for v in self.specs[later].reads:
                readers = [r for r in self.readers[v] if self.stage[r.name] == later]
                if (
                    v != INPUT
                    and self.stage[v] == s
                    and any(not isinstance(r.layer, BatchNorm) for r in readers)
                ):
                    out.append((v, later))
        return out


def step_plan(nodes, chunks_hw=None):
    """A :class:`StepPlan` of ``nodes`` (a program's, in order) on batch chunks, or on the
    spatial tiles ``chunks_hw`` (the input's row and column chunks); ``ValueError`` saying why
    the tiles cannot run the program."""
    return StepPlan(nodes, chunks_hw)


def _interval_overlap(a, b):
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class TileRegions:
    """Where every tile of a tiled training step works (see the module docstring).

    ``grid`` is the tiles per axis, ``bounds`` the tile boundaries in input pixels per axis;
    ``full[a][v]`` the length of value ``v`` along axis ``a`` (0: rows, 1: columns)."""

    def __init__(self, plan, chunks_hw):
        self.plan, self._memo = plan, {}
        tiled_nodes = [n for n in plan.nodes if plan.specs[plan.stage[n.name]].tiled]
        spans = []
        for n in tiled_nodes:
            reach = n.layer.reach()
            if reach is None:
                raise ValueError(
                    f"node {n.name!r} ({type(n.layer).__name__}) reads its whole input on a tile"
                )
            spans.append((n.name, n.inputs, reach))
        self.bounds, self.full, self.scale, self.align = [], [], [], []
        self.own, self.windows, self.origin = [], [], []
        for a, chunks in enumerate(chunks_hw):
            self._axis(a, spans, chunks)
        self.grid = tuple(len(b) - 1 for b in self.bounds)

    def _axis(self, a, spans, chunks):
        plan, L = self.plan, sum(chunks)
        scale, F = _scales(spans, a)
        full = _lengths(spans, a, L)
        if full is None:
            raise ValueError(f"an image {L} pixels long on axis {a + 2} is too small for the network")
        bounds, at = [0], 0
        for c in chunks[:-1]:
            at += c
            b = (at + F // 2) // F * F  # the nearest multiple of F
            if bounds[-1] < b < L:
                bounds.append(b)
        bounds.append(L)
        if len(bounds) == 2 and len(chunks) > 1:
            raise ValueError(
                f"tiles of {chunks} pixels on axis {a + 2} are smaller than the network's alignment {F}"
            )
        n = len(bounds) - 1
        own = {INPUT: tuple((bounds[k], bounds[k + 1]) for k in range(n))}
        for v in scale:
            if v == INPUT:
                continue
            cuts = [min(full[v], int(b * scale[v])) for b in bounds[:-1]] + [full[v]]
            own[v] = tuple((cuts[k], cuts[k + 1]) for k in range(n))
            if any(lo >= hi for lo, hi in own[v]):
                raise ValueError(
                    f"a tile of {chunks} pixels on axis {a + 2} holds no pixel of node {v!r}: "
                    "use larger tiles"
                )
        windows, origin = {}, {}
        full = {INPUT: L, **full}
        for s, spec in enumerate(plan.specs):
            if not spec.tiled:
                continue
            members = [sp for sp in spans if plan.stage[sp[0]] == s]
            stage = _Stage(members, spec.reads, scale, full, a)
            outs = [v for v in spec.carried] + [v for v in spec.names if v == plan.nodes[-1].name]
            for k in range(n):
                w, lw = stage.window(outs, own, k, bounds[k], bounds[k + 1])
                windows[s, k] = w
                origin[s, k] = {v: (int(w[0] * scale[v]), lw[v]) for v in (*spec.reads, *spec.names)}
                for v, (o, m) in origin[s, k].items():
                    assert 0 <= o and o + m <= full[v], (v, o, m, full[v])
        del full[INPUT]
        self.bounds.append(tuple(bounds))
        self.full.append(full)
        self.scale.append(scale)
        self.align.append(F)
        self.own.append(own)
        self.windows.append(windows)
        self.origin.append(origin)

    # -- what the lowering asks ------------------------------------------------------------------
    def tiles(self):
        """Every tile ``(i, j)``, row by row."""
        return [(i, j) for i in range(self.grid[0]) for j in range(self.grid[1])]

    def own_region(self, v, ij):
        """Tile ``ij``'s own region of value ``v`` (``((y0, y1), (x0, x1))``); ``ij`` None: the
        whole value."""
        key = ("own", v, ij)
        if key not in self._memo:
            if ij is None:
                self._memo[key] = tuple((0, self.full[a][v]) for a in range(2))
            else:
                self._memo[key] = tuple(self.own[a][v][ij[a]] for a in range(2))
        return self._memo[key]

    def read_region(self, s, ij, v):
        """The region of value ``v`` that tile ``ij``'s stage ``s`` task holds (a value it reads
        or computes: its window run's extent); ``ij`` None: the whole value."""
        if ij is None:
            return self.own_region(v, None) if v != INPUT else None
        key = ("read", s, ij, v)
        if key not in self._memo:
            self._memo[key] = tuple((o, o + m) for o, m in (self.origin[a][s, ij[a]][v] for a in range(2)))
        return self._memo[key]

    def overlap(self, src, dst):
        """``(source slices, destination slices)`` of the part of region ``src`` in region
        ``dst``, relative to each, or None where they do not meet (memoised: every step of a
        layout asks the same)."""
        key = ("overlap", src, dst)
        if key not in self._memo:
            ov = [_interval_overlap(src[a], dst[a]) for a in range(2)]
            self._memo[key] = (
                None
                if None in ov
                else (
                    tuple(slice(o[0] - s[0], o[1] - s[0]) for o, s in zip(ov, src)),
                    tuple(slice(o[0] - d[0], o[1] - d[0]) for o, d in zip(ov, dst)),
                )
            )
        return self._memo[key]

    def full_hw(self, v):
        return tuple(self.full[a][v] for a in range(2))

    def redundancy(self, s):
        """How many more pixels of its reads stage ``s``'s tiles hold than the values have (the
        halos' redundant work), as a fraction."""
        spec = self.plan.specs[s]
        held = whole = 0
        for v in spec.reads:
            if v == INPUT:
                L = [self.bounds[a][-1] for a in range(2)]
            else:
                L = self.full_hw(v)
            whole += L[0] * L[1]
            for ij in self.tiles():
                (y0, y1), (x0, x1) = self.read_region(s, ij, v)
                held += (y1 - y0) * (x1 - x0)
        return held / whole - 1 if whole else 0.0


class _Stage:
    """One tiled stage's nodes along one axis, for the search of a tile's window: its own
    alignment (what its nodes' strides and its values' scales need, not the whole network's,
    so a stage at full resolution reads a halo of a pixel or two, not of the network's
    alignment) and its nodes' lengths on a window of the values it reads."""

    def __init__(self, members, reads, scale, full, axis):
        self.members, self.reads, self.scale, self.full, self.axis = members, reads, scale, full, axis
        align = 1
        for v in (*reads, *(m[0] for m in members)):
            align = math.lcm(align, scale[v].denominator)
        for _, inputs, reach in members:
            r = reach[axis]
            if r.kind == "window":
                align = math.lcm(align, (scale[inputs[0]] / r.stride).denominator)
        self.align = align

    def lengths(self, a, b):
        """Each value's length (the reads' and the stage's nodes') on the input window
        ``[a, b)``, or None where a node would be empty or meet inputs of different lengths."""
        L = self.full[INPUT]
        length = {}
        for v in self.reads:
            hi = self.full[v] if b == L else min(self.full[v], int(b * self.scale[v]))
            length[v] = hi - int(a * self.scale[v])
        for name, inputs, reach in self.members:
            ins = {length[i] for i in inputs}
            if len(ins) != 1:
                return None
            length[name] = reach[self.axis].length(ins.pop())
            if length[name] < 1:
                return None
        return length

    def window(self, outs, own, k, lo, hi):
        """Tile ``k``'s input window ``(a, b)`` (grown from ``[lo, hi)`` by the stage's
        alignment until the stage computes ``outs`` on the tile's own regions exactly) and the
        values' lengths on it."""

        def exact(a, b):
            lw = self.lengths(a, b)
            return (False, False) if lw is None else self.exact(lw, outs, own, k, a)

        a, b = grow_window(exact, lo, hi, self.full[INPUT], self.align, f"tile {k} of {outs}")
        return (a, b), self.lengths(a, b)

    def exact(self, lw, outs, own, k, a):
        """Whether the stage's run on the window starting at ``a`` (values' lengths ``lw``)
        computes ``outs`` on tile ``k``'s own regions exactly: ``(left_ok, right_ok)``.  A
        window edge is a true edge where the value's window starts at 0 or ends at the value's
        end; a node may read past a true edge only (its padding is then the image's)."""
        need, off = {}, {v: int(a * self.scale[v]) for v in lw}
        for u in outs:
            o0, o1 = own[u][k][0] - off[u], own[u][k][1] - off[u]
            if not (0 <= o0 and o1 <= lw[u]):
                return False, False
            need[u] = (o0, o1)
        for name, inputs, reach in reversed(self.members):
            if name not in need:
                continue
            lo, hi = reach[self.axis].needs(*need[name])
            for i in inputs:
                need[i] = (min(lo, need[i][0]), max(hi, need[i][1])) if i in need else (lo, hi)
        left = right = True
        for name, (lo, hi) in need.items():
            left &= off[name] == 0 or lo >= 0
            right &= off[name] + lw[name] == self.full[name] or hi <= lw[name]
        return left, right
