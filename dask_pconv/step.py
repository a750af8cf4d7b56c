"""One training step as a pure function: the lazy graph of forward, backward and the optimizer
update, built from what it is given and nothing else.

No cluster, loop, progress bar or client is involved: :class:`~dask_pconv.train.Trainer` places
the inputs, calls :func:`training_step` and persists what it returns; a test can compute the
outputs on the synchronous scheduler.
"""

from __future__ import annotations

from typing import NamedTuple

from .stages.step import staged_step, unstaged

__all__ = ["StepOutputs", "training_step"]


class StepOutputs(NamedTuple):
    """The lazy results of one training step."""

    params: dict  #: name -> Dask array, after the update
    velocities: dict  #: name -> Dask array, the optimizer's new state
    state: dict  #: BatchNorm running statistics after the step (name -> Dask array)
    loss: object  #: 0-d Dask array: the mean softmax cross-entropy of the batch
    accuracy: object  #: 0-d Dask array: the batch's accuracy before the update


def training_step(model, optimizer, params, state, velocities, x, t, step, dropout=True):
    """The graph of one training step (BatchNorm in training mode).

    Parameters
    ----------
    model
        Has ``forward_backward_aux(x, t, train, dropout, step, params, state)`` (e.g.
        :class:`~dask_pconv.models.VGG16`); only its structure is used, not its own
        parameters or state.
    optimizer
        Has ``update(params, grads, velocities) -> (new_params, new_velocities)`` (e.g.
        :class:`~dask_pconv.optim.MomentumSGD`).
    params, state, velocities : dict
        Name -> array: the parameters, the BatchNorm running statistics and the optimizer's
        velocities before the step.
    x : dask.array.Array, shape (N, C, H, W)
        The batch, chunked as the step is split.
    t : dask.array.Array, shape (N,) or (N, H, W)
        Its labels (per pixel for a segmentation network).
    step : int
        The step's index: dropout masks are a function of (seed, step, layer, element).
    dropout : bool

    Notes
    -----
    A program with BatchNorms, split into batch chunks, spatial tiles or both, with momentum
    SGD, runs as coarse stages (:mod:`dask_pconv.stages.step`: one task per block between two
    BatchNorm synchronisations; :func:`~dask_pconv.stages.step.unstaged` says why a step does
    not); any other step as the fine-grained graph of the tape.  Both give the same result to
    rounding; ``dask.config.set({"pconv.staged": False})`` forces the second.

    Returns
    -------
    StepOutputs
        All lazy.  The running statistics not updated by the step (none for VGG16) keep their
        values from ``state``.
    """
    x = model.check_input(x)  # the staged path reads the batch's blocks directly
    if unstaged(model, optimizer, params, x) is None:
        outs = staged_step(model, optimizer, params, state, velocities, x, t, step, dropout)
        return StepOutputs(*outs)
    loss, grads, aux = model.forward_backward_aux(
        x, t, train=True, dropout=dropout, step=step, params=params, state=state
    )
    new_params, new_velocities = optimizer.update(params, grads, velocities)
    return StepOutputs(new_params, new_velocities, {**state, **aux["state"]}, loss, aux["accuracy"])
