"""Sums over chunks as trees of tasks: the partial convolutions of input-channel chunks, the
weight gradients of every window and the per-channel statistics of BatchNorm."""

from __future__ import annotations

SPLIT_EVERY = 4


def _sum(arrays):
    out = arrays[0] + arrays[1]
    for a in arrays[2:]:
        out += a
    return out


def tree_sum(dsk, out_key, parts, split_every=SPLIT_EVERY, combine=None):
    """Add tasks to ``dsk`` that sum ``parts`` into ``out_key`` as a tree.

    ``parts`` is a list of ``(key, task)``: each part's task is added under its key, except a
    lone part, whose task becomes ``out_key`` itself (no alias task).  ``combine`` (a function
    of a list of blocks) replaces the sum.
    """
    combine = combine or _sum
    parts = list(parts)
    if not parts:
        raise ValueError("tree_sum needs at least one part")
    if len(parts) == 1:
        dsk[out_key] = parts[0][1]
        return
    dsk.update(parts)
    keys = [k for k, _ in parts]
    level = 0
    while len(keys) > split_every:
        nxt = []
        for i in range(0, len(keys), split_every):
            group = keys[i : i + split_every]
            if len(group) == 1:
                nxt.append(group[0])
                continue
            k = (out_key[0] + "-partial", level, i) + tuple(out_key[1:])
            dsk[k] = (combine, group)
            nxt.append(k)
        keys = nxt
        level += 1
    dsk[out_key] = (combine, keys) if len(keys) > 1 else keys[0]
