"""Training: :class:`Trainer`, one Dask graph per step (forward, backward, optimizer update),
the parameters persisted on the workers, only scalars back to the client, a checkpoint per
epoch.

A step's graph is :func:`dask_pconv.step.training_step`; where its inputs live,
:mod:`dask_pconv.placement`; the epoch loop (progress, Ctrl-C, restarts after a lost worker),
:mod:`dask_pconv.loop`; the checkpoint format, :mod:`dask_pconv.checkpoint`; the log table and
plots, :mod:`dask_pconv.report` (``LOG_KEYS``, ``WorkerLossError``, ``load_checkpoint`` and
``save_checkpoint`` stay importable from here)."""

from __future__ import annotations

import sys
from pathlib import Path

import dask

from .batching import check_split, chunk_batch
from .checkpoint import Snapshot, latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluation import evaluate
from .graphstats import optimized_graph
from .loop import WorkerLossError, run_epochs
from .optim import MomentumSGD
from .placement import StepInputs
from .report import LOG_KEYS, write_log
from .stages.step import unstaged
from .step import training_step

__all__ = ["LOG_KEYS", "Trainer", "WorkerLossError", "load_checkpoint", "save_checkpoint"]


class Trainer:
    """Trains a model (e.g. :class:`~dask_pconv.models.VGG16`) on the active Dask scheduler.

    Parameters
    ----------
    model : dask_pconv.models.Model
        E.g. :class:`~dask_pconv.models.VGG16`; its ``params`` and ``state`` are replaced by
        each step's (persisted) results.
    train_set, val_set : dask_pconv.data.Dataset
    batch_size : int
    split : dict
        From :func:`dask_pconv.data.parse_split`; ``out_channel`` (or its old name ``channel``)
        chunks the parameters' output channels in the steps and evaluations (the model's own
        ``channel_split`` otherwise; the model is not changed).  Checked against
        ``batch_size`` and the images' shape (:func:`dask_pconv.data.check_split`):
        ``ValueError`` if it does not fit.
    optimizer : MomentumSGD
    seed : int
        Shuffling per epoch and dropout masks.
    out : path, optional
        Folder for ``log.json``, ``loss.png``, ``accuracy.png`` and ``checkpoint_epoch_E.npz``.
    dropout : bool
    progress : bool
        A progress bar per epoch (tqdm, on stderr).
    stream : file, optional
        Where the LogReport table goes (standard output by default).
    replicate : bool
        Before each step, copy the parameters, velocities and BatchNorm state to every worker
        (``Client.replicate``), so that a worker lost in the middle of a step, or after it
        but before the next one starts, loses nothing the step cannot recompute: the step then
        completes with bitwise the same result.  Costs a copy of the parameters per step on
        every worker (and the previous step's until the next one starts), and waits for the
        previous step (no pipelining).  Stops the scheduler's Active Memory Manager, whose
        ReduceReplicas policy would remove the copies again (``Client.replicate`` documents
        the conflict); :meth:`run` starts it again when it returns.
    to_device : callable, optional
        Copies a NumPy block to the accelerator (``cupy.asarray``).  Batches then have device
        blocks, the parameters, velocities and BatchNorm state move to the device with the
        first step and stay there; only the loss and accuracy come back (checkpoints copy the
        arrays back explicitly).
    max_restarts : int
        How often :meth:`run` restarts from the last complete epoch after losing a worker with
        data nothing else can recompute (the parameters persisted only there), before it gives
        up with :class:`WorkerLossError`.  Counted per epoch.
    """

    def __init__(
        self,
        model,
        train_set,
        val_set,
        *,
        batch_size=64,
        split=None,
        optimizer=None,
        seed=0,
        out=None,
        dropout=True,
        progress=True,
        stream=None,
        replicate=False,
        to_device=None,
        max_restarts=3,
    ):
        if batch_size < 1 or batch_size > len(train_set.t):
            raise ValueError(f"batch_size must be in [1, {len(train_set.t)}], got {batch_size}")
        self.model, self.train_set, self.val_set = model, train_set, val_set
        # refused here, not at the first step (issue 10: a traceback after the cluster started)
        split = check_split(split or {}, (batch_size, *train_set.x.shape[1:]))
        self.batch_size, self.split = batch_size, split
        self._inputs = StepInputs(model, self.split.get("out_channel"), replicate)
        self.opt = optimizer or MomentumSGD()
        self.seed, self.dropout, self.progress, self.replicate = seed, dropout, progress, replicate
        self.to_device = to_device
        if not (isinstance(max_restarts, int) and max_restarts >= 0):
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        self.max_restarts = max_restarts
        self.out = Path(out) if out is not None else None
        self.stream = stream or sys.stdout
        self.epoch, self.step = 0, 0
        self.log = []
        self.tasks_per_step = None
        #: which graph a step is (:func:`dask_pconv.stages.step.unstaged`): ``"stages"`` or
        #: ``"fine-grained: <why not staged>"``; None before the first step
        self.step_graph = None
        self.elapsed = 0.0

    @property
    def velocities(self):
        """The optimizer's velocities (name -> array), None before the first step."""
        return self._inputs.velocities

    @velocities.setter
    def velocities(self, value):
        self._inputs.velocities = value

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_path(self, epoch):
        return self.out / f"checkpoint_epoch_{epoch}.npz"

    def save(self):
        """Write ``checkpoint_epoch_E.npz`` (E the epoch done) to ``out``."""
        self.snapshot().save(self.checkpoint_path(self.epoch), self.seed)

    def snapshot(self):
        """A :class:`~dask_pconv.checkpoint.Snapshot` of the run as it stands: host copies of
        the parameters, state and velocities with the epoch, step, log and :attr:`elapsed`."""
        m = self.model
        return Snapshot.take(
            m.params, m.state, self.velocities, self.epoch, self.step, self.log, self.elapsed
        )

    def restore(self, snap, source=None):
        """Back to ``snap``: the model's parameters and state are checked and replaced
        (``Model.load_params``: nothing is replaced unless everything checks out), and go to
        the cluster again with the next step.  ``source`` (a checkpoint's path) names the file
        in a ``ValueError``."""
        try:
            self.model.load_params(snap.params, snap.state)
        except (KeyError, TypeError, ValueError) as e:
            if source is None:
                raise
            raise ValueError(f"checkpoint {source}: {e.args[0] if e.args else e}") from e
        vel = snap.velocities
        self._inputs.reset(
            None if vel is None else {k: v.astype(self.model.dtype, copy=False) for k, v in vel.items()}
        )
        self.epoch, self.step, self.elapsed = snap.epoch, snap.step, snap.elapsed
        self.log = list(snap.log)

    def latest_checkpoint(self):
        """The newest ``checkpoint_epoch_E.npz`` in ``out``, or None."""
        return None if self.out is None else latest_checkpoint(self.out)

    def resume(self, path=None):
        """Continue from ``path`` or the newest checkpoint in ``out``; False if there is none.

        The checkpoint is checked whole first (:func:`load_checkpoint`, then its names and
        shapes against the model, BatchNorm running variances >= 0): a ``ValueError`` naming
        the file and the field, and nothing in the model or the trainer is replaced.
        """
        path = path or self.latest_checkpoint()
        if path is None:
            return False
        self.restore(Snapshot.load(path, self.model.params), source=path)
        return True

    # -- one step --------------------------------------------------------------------------
    def train_step(self, x, t):
        """One graph: forward, backward, update; persists the new parameters, returns
        ``(loss, accuracy)`` as floats."""
        loss, acc = dask.compute(*self.submit_step(x, t))
        return float(loss), float(acc)

    def submit_step(self, x, t):
        """Build the step's graph and hand it to the scheduler (``persist``) without waiting.

        Returns the persisted ``(loss, accuracy)`` 0-d arrays.  The next step's graph can be
        built while this one runs: its parameters are this step's persisted results.
        """
        xd, td = chunk_batch(x, t, self.split, to_device=self.to_device)
        params, vel, state = self._inputs.get(xd, self.opt.init_state)
        outs = training_step(self.model, self.opt, params, state, vel, xd, td, self.step, self.dropout)
        if self.step_graph is None:
            reason = unstaged(self.model, self.opt, params, xd)
            self.step_graph = "stages" if reason is None else f"fine-grained: {reason}"
        if self.tasks_per_step is None:
            self.tasks_per_step = _count_tasks(outs)
        new_p, new_v, new_state, loss, acc = dask.persist(*outs)
        self._inputs.update(new_p, new_v, new_state)
        self.step += 1
        return loss, acc

    #: At most this many bytes of images in one evaluation graph.  The batches travel inside
    #: the graphs, so a large validation set is evaluated in several graphs rather than one
    #: (CIFAR-10's 10,000 test images are 123 MB).
    eval_graph_bytes = 8 * 2**20

    def evaluate(self, dataset):
        """Mean loss and accuracy in evaluation mode over ``dataset``, as floats
        (:func:`dask_pconv.evaluation.evaluate`, at most :attr:`eval_graph_bytes` of images in
        one graph); the result does not depend on the grouping."""
        return evaluate(
            self.model, dataset, self.batch_size, self.split, self.to_device, self.eval_graph_bytes
        )

    # -- epochs ----------------------------------------------------------------------------
    def run(self, epochs):
        """Train until ``epochs`` epochs are done (continuing from a resumed epoch).

        Returns the log (a list of per-epoch dicts, Chainer's LogReport keys).  A checkpoint is
        written after each epoch when ``out`` is set.  Raises ``FloatingPointError`` when the
        training loss becomes NaN or Inf (nothing is saved from a diverged step).

        Ctrl-C (SIGINT, when ``run`` is called from the main thread with Python's default
        handler in place): the first stops training at the next step boundary, so a checkpoint
        being written completes, and raises ``KeyboardInterrupt`` there; a second stops at once.
        Either way the last complete checkpoint stays intact and :meth:`resume` continues from
        it.

        A worker lost with data that cannot be recomputed (without ``replicate``: parameters
        persisted only there) ends the epoch's computation in a ``CancelledError`` or
        ``KilledWorker``.  ``run`` then goes back to the end of the last complete epoch (host
        copies taken there, the checkpoint's contents; where ``run`` began if no epoch is done
        yet), says so on one line of standard error, and trains from there: shuffling and
        dropout depend only on the seed, epoch and step, so the result is bitwise that of a run
        without the fault.  After ``max_restarts`` restarts from the same point it raises
        :class:`WorkerLossError`.
        """

        try:
            run_epochs(self, epochs)
        finally:
            self._inputs.restart_memory_manager()  # if replicate=True stopped it
        return self.log

    def write_log(self):
        """``log.json`` and the plots in ``out`` (:func:`dask_pconv.report.write_log`)."""
        write_log(self.out, self.log)


def _count_tasks(collections):
    """Tasks in the step's graph after Dask's blockwise fusion and culling.  Its linear fusion of
    task chains is left out: which chains it fuses changes from graph to graph of the same
    structure (seen with channel splits: 4 tasks in 1,500 up or down from step to step), and the
    aliases it leaves for staged keys are no tasks."""
    return len(optimized_graph(collections))
