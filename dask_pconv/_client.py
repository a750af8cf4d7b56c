"""The active ``distributed`` client, for the code that uses one when it is there (writing
zarr, placing a model's weights on the workers) and runs on any scheduler when it is not.

Importing this module does not import ``distributed``: ``import dask_pconv`` stays free of it,
and only :mod:`dask_pconv.cluster` (starting or connecting to a cluster) needs it up front.
"""

from __future__ import annotations

import sys

import dask.array as da
import numpy as np

__all__ = ["active_client", "scatter_arrays"]


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
