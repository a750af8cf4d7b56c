"""Evaluation: a model's mean loss and accuracy over a dataset, in graphs of bounded size."""

from __future__ import annotations

import dask

from .batching import chunk_batch, split_for
from .ops.nn import accuracy, softmax_cross_entropy

__all__ = ["evaluate"]


def evaluate(model, dataset, batch_size, split, to_device=None, graph_bytes=8 * 2**20):
    """Mean loss and accuracy of ``model`` (evaluation mode: running BatchNorm statistics, no
    dropout) over ``dataset``, as floats.

    The batches travel inside the graphs, so the set is evaluated in one graph per group of
    batches holding at most ``graph_bytes`` of images (at least one batch per graph); the
    result does not depend on the grouping.  ``split`` and ``to_device`` are as for
    :func:`~dask_pconv.batching.chunk_batch` (a short last batch gets at most as many pieces as
    images); the split's ``out_channel`` chunks the parameters (``model.predict(x,
    channel_split=...)``).
    """
    n = len(dataset.t)
    batch_bytes = batch_size * dataset.x[:1].nbytes
    per_graph = max(1, graph_bytes // max(1, batch_bytes))
    starts = range(0, n, batch_size)
    parts = []
    for g in range(0, len(starts), per_graph):
        graph = []
        for i in starts[g : g + per_graph]:
            x, t = dataset.x[i : i + batch_size], dataset.t[i : i + batch_size]
            xd, td = chunk_batch(x, t, split_for(split, len(t)), to_device=to_device)
            z = model.predict(xd, channel_split=split.get("out_channel"))
            graph.append((softmax_cross_entropy(z, td) * len(td), accuracy(z, td) * len(td)))
        parts.extend(dask.compute(graph)[0])
    return float(sum(p[0] for p in parts) / n), float(sum(p[1] for p in parts) / n)
