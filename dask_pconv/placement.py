"""Where a training step's inputs live: the parameters, optimizer velocities and running
statistics of a model, chunked for the channel split, placed on the cluster once and, with
``replicate``, copied to every worker before each step.

The training loop asks :class:`StepInputs` for a step's inputs and hands back its outputs; the
cluster calls (scatter, replicate, the Active Memory Manager) are :mod:`dask_pconv._client`'s.
Without a distributed client everything here is a no-op beyond the chunking.
"""

from __future__ import annotations

import dask
import numpy as np

from ._client import active_client, replicate, restart_memory_manager, scatter_arrays

__all__ = ["StepInputs"]


class StepInputs:
    """A model's arrays as one training step reads them.

    Parameters
    ----------
    model : dask_pconv.models.Model
        Its ``params`` and ``state`` are read, and replaced by each step's results
        (:meth:`update`), so that the model always holds the newest (persisted) arrays.
    channel_split : int, optional
        Chunks of the output channels (``Model.chunked``); the model's own by default.
    replicate : bool
        Copy every input to every worker before each step (see ``Trainer(replicate=...)``).
    """

    def __init__(self, model, channel_split=None, replicate=False):
        self.model, self.channel_split, self.replicate = model, channel_split, replicate
        self.velocities = None
        self.placed = False  # the first step's inputs are placed in a graph of their own
        self.memory_manager_stopped = False
        self._held = None

    def reset(self, velocities):
        """After a restore or a resume: host arrays to place again, as at the start."""
        self.velocities = velocities
        self.placed = False

    def _scatter(self):
        """Scatter NumPy parameters and state to the cluster once, so that no step's graph
        carries them (at width 1 they are 60 MB); a no-op without a distributed client."""
        client = active_client()
        if client is None:
            return
        for store in (self.model.params, self.model.state):
            if any(isinstance(v, np.ndarray) for v in store.values()):
                store.update(scatter_arrays(store, client))

    def get(self, x, init_velocities):
        """``(params, velocities, state)`` for a step on batch ``x``: Dask arrays chunked for
        the split, on ``x``'s device; ``init_velocities(params)`` makes the first velocities."""
        m, split = self.model, self.channel_split
        self._scatter()
        params = m.dask_params(like=x, channel_split=split)
        if self.velocities is None:
            self.velocities = init_velocities(params)
        vel = m.chunked(self.velocities, like=x, channel_split=split)
        state = m.chunked(m.state, like=x, channel_split=split)
        if not self.placed:
            # Chunk and place the first step's inputs (scattered or checkpointed arrays, zero
            # velocities) in a graph of their own, as every later step finds them: otherwise
            # that step's graph carries this work too, and its task count, the one reported,
            # differs between a new run and a resumed one.
            params, vel, state = dask.persist(params, vel, state)
            self.update(params, vel, state)
            self.placed = True
        if self.replicate:
            self.memory_manager_stopped |= replicate([params, vel, state])
            # Hold this step's inputs (now on every worker) until the next step has replicated
            # this step's outputs: a worker lost after the step finished, before that, loses
            # outputs that exist only there, and the scheduler recomputes them from these.
            self._held = (params, vel, state)
        return params, vel, state

    def update(self, params, velocities, state):
        """Take a step's (persisted) results as the next step's inputs."""
        self.model.params, self.velocities = dict(params), dict(velocities)
        self.model.state.update(state)

    def restart_memory_manager(self):
        """Give the cluster back the Active Memory Manager that ``replicate`` stopped."""
        if self.memory_manager_stopped:
            restart_memory_manager()
            self.memory_manager_stopped = False
