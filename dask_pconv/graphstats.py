"""The shape of a task graph: how many tasks it has and how long its longest chain of dependent
tasks is.

On dask.distributed every dependent hop costs a round trip through the scheduler (a few
milliseconds), so a graph whose tasks are cheap runs in about ``critical_path x hop`` however
many workers it has: with the task count, the figure to watch when a step is slow for its
compute.

    from dask_pconv.graphstats import graph_stats
    stats = graph_stats(training_step(...))       # a StepOutputs, a dict, a list or one array
    stats.tasks, stats.critical_path
"""

from __future__ import annotations

from typing import NamedTuple

import dask
from dask.base import is_dask_collection

__all__ = ["GraphStats", "graph_stats", "optimized_graph"]


class GraphStats(NamedTuple):
    """What :func:`graph_stats` counts.  ``tasks + aliases + inputs`` is the number of keys
    in the optimised graph (what :attr:`~dask_pconv.train.Trainer.tasks_per_step` counts)."""

    tasks: int  #: keys that run a computation or hold data of their own
    critical_path: int  #: tasks on the longest chain of dependent tasks
    aliases: int  #: keys whose value is just another key (no task runs, no hop)
    inputs: int  #: keys that refer to results already held by the cluster (persisted)


def graph_stats(collections):
    """Task count and critical path of the graph of ``collections``, after Dask's optimisation.

    The graph is optimised as :class:`~dask_pconv.train.Trainer` counts its step's tasks
    (:func:`optimized_graph`): every collection together, as ``compute`` and ``persist`` hand
    it to the scheduler (culling and blockwise fusion), with linear fusion of task chains off
    (``optimization.fuse.active``: which chains it fuses changes between graphs of the same
    structure).  Nothing is computed.

    Parameters
    ----------
    collections : Dask collection, or dict / list / tuple of them, nested
        E.g. one array, or the :class:`~dask_pconv.step.StepOutputs` of
        :func:`~dask_pconv.step.training_step` (a tuple of dicts and arrays).  Anything that is
        not a Dask collection (a NumPy array, a float) is ignored.

    Returns
    -------
    GraphStats
        ``tasks``: keys that run a computation, or hold data the graph carries (a NumPy
        array given to ``from_array``: the scheduler handles it as a task).  ``critical_path``:
        the most tasks on one chain of dependencies from a root to an output (a chain of
        ``n`` tasks: ``n``; an empty graph: 0).  ``aliases``: keys whose value is another key
        (Dask's ``Alias``); they are not tasks and add nothing to a path: a path through one
        goes straight to its target.  ``inputs``: keys whose value is a reference to that key's
        own result on the cluster (a persisted collection's ``Future``); not tasks either: the
        data is there before the graph starts.  ``tasks + aliases + inputs`` is the number of
        keys of the optimised graph.

    Notes
    -----
    On the local schedulers (synchronous, threads) a persisted collection holds its values in
    its graph, not futures: there its keys count as tasks, roots of one task each, so a step
    built on them has one task more on its critical path than on a distributed cluster.
    """
    from dask._task_spec import Alias, convert_legacy_graph
    from dask.core import toposort

    dsk = optimized_graph(collections)
    if not dsk:
        return GraphStats(0, 0, 0, 0)
    # Dask's own normal form: legacy tuples become Tasks, literal values DataNodes, a key as a
    # value an Alias; a key whose value refers to its own result (a persisted Future) is
    # dropped, as the schedulers drop it: its dependents find the result held already.
    graph = convert_legacy_graph(dsk)
    inputs = len(dsk) - len(graph)
    # Dependencies on keys outside the graph (persisted inputs) cost no hop: left out.
    deps = {k: {d for d in node.dependencies if d in graph} for k, node in graph.items()}
    is_alias = {k: isinstance(node, Alias) for k, node in graph.items()}
    depth = {}  # key -> most tasks on a chain ending at it (it included)
    for k in toposort(graph, dependencies=deps):  # dependencies first
        below = max((depth[d] for d in deps[k]), default=0)
        depth[k] = below + (0 if is_alias[k] else 1)
    aliases = sum(is_alias.values())
    return GraphStats(len(graph) - aliases, max(depth.values(), default=0), aliases, inputs)


def optimized_graph(collections):
    """The graph of ``collections`` (as :func:`graph_stats` takes them) as the scheduler gets
    it from ``compute`` or ``persist``: every collection optimised together (culling and
    blockwise fusion, linear fusion of task chains off), as a dict.  (``dask.optimize`` would
    optimise each collection on its own: for a step's hundred-odd output arrays sharing one
    graph, 30-50 times slower.)"""
    from dask.base import collections_to_expr

    flat = _flatten(collections)
    if not flat:
        return {}
    with dask.config.set({"optimization.fuse.active": False}):
        return dict(collections_to_expr(flat, optimize_graph=True).optimize().__dask_graph__())


def _flatten(obj):
    """The Dask collections in ``obj`` (nested dicts, lists and tuples), in order."""
    if is_dask_collection(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [c for item in obj for c in _flatten(item)]
    return []
