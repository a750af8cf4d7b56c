"""The active ``distributed`` client, for the code that uses one when it is there (writing
zarr, placing a model's weights on the workers, replicating them, recognising lost data) and
runs on any scheduler when it is not.

Importing this module does not import ``distributed``: ``import dask_pconv`` stays free of it,
and only :mod:`dask_pconv.cluster` (starting or connecting to a cluster) needs it up front.
"""

from __future__ import annotations

import sys
from concurrent.futures import CancelledError

import dask.array as da
import numpy as np

__all__ = ["active_client", "lost_data_errors", "replicate", "restart_memory_manager", "scatter_arrays"]


def active_client():
    """The default ``distributed.Client``, or None when none is active."""
    if "distributed" not in sys.modules:
        # a client exists only once distributed is imported: no need to import it to say so
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:  # "No clients found"
        return None


def scatter_arrays(mapping, client):
    """A copy of ``mapping`` whose NumPy values are scattered to the cluster once, as Dask
    arrays on the futures, so that graphs using them do not carry the data (a VGG16's weights
    are 60 MB at width 1)."""
    out = dict(mapping)
    names = [k for k, v in mapping.items() if isinstance(v, np.ndarray)]
    if names:
        # hash=False: keys of their own; hashed by content, equal arrays (BatchNorm's ones and
        # zeros of one size) shared one key, and the first step's graph had fewer tasks
        futures = client.scatter([mapping[k] for k in names], hash=False)
        for k, f in zip(names, futures):
            out[k] = da.from_delayed(f, shape=mapping[k].shape, dtype=mapping[k].dtype)
    return out


def replicate(collections):
    """Copy the persisted data behind these Dask arrays to every worker (if any).  Returns
    whether it stopped the scheduler's Active Memory Manager to do so."""
    client = active_client()
    if client is None:
        return False
    from distributed import futures_of

    stopped = False
    futures = futures_of([v for group in collections for v in group.values()])
    if futures:
        if client.amm.running():
            # its ReduceReplicas policy would drop the copies again within seconds
            # (https://distributed.dask.org/en/stable/active_memory_manager.html)
            client.amm.stop()
            stopped = True
        client.replicate(futures)
    return stopped


def restart_memory_manager():
    """Start the scheduler's Active Memory Manager again (after :func:`replicate` stopped it)."""
    active_client().amm.start()


def lost_data_errors():
    """The exceptions a computation ends in when a worker was lost with data nothing else can
    recompute: ``CancelledError`` (``FutureCancelledError`` is one), and distributed's
    ``KilledWorker`` once distributed is imported (a client exists only then)."""
    if "distributed" not in sys.modules:
        return (CancelledError,)
    from distributed.scheduler import KilledWorker

    return (CancelledError, KilledWorker)
