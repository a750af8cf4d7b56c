"""The training loop: one Dask graph per step (forward, backward, optimizer update), the
parameters persisted on the workers, only scalars back to the client, a checkpoint per epoch.

The checkpoint format is :mod:`dask_pconv.checkpoint`, the log table and plots
:mod:`dask_pconv.report` (``LOG_KEYS``, ``load_checkpoint`` and ``save_checkpoint`` stay
importable from here)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np

from ._client import active_client, lost_data_errors, replicate, restart_memory_manager, scatter_arrays
from .backend import to_host
from .batching import check_split, epoch_batches, to_dask
from .checkpoint import check_velocities, latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluation import evaluate
from .optim import MomentumSGD
from .report import LOG_KEYS, format_row, write_log
from .step import training_step

__all__ = ["LOG_KEYS", "Trainer", "WorkerLossError", "load_checkpoint", "save_checkpoint"]


class WorkerLossError(RuntimeError):
    """Workers were lost in the same epoch more often than ``Trainer(max_restarts=...)``
    allows."""


class Trainer:
    """Trains a model (e.g. :class:`~dask_pconv.models.VGG16`) on the active Dask scheduler.

    Parameters
    ----------
    model
        Has ``params``, ``state``, ``dask_params()``, ``forward_backward_aux`` and ``predict``.
    train_set, val_set : dask_pconv.data.Dataset
    batch_size : int
    split : dict
        From :func:`dask_pconv.data.parse_split`; ``out_channel`` (or its old name ``channel``)
        sets ``model.channel_split``.  Checked against ``batch_size`` and the images' shape
        (:func:`dask_pconv.data.check_split`): ``ValueError`` if it does not fit.
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
        if "out_channel" in self.split:
            model.channel_split = self.split["out_channel"]
        self.opt = optimizer or MomentumSGD()
        self.seed, self.dropout, self.progress, self.replicate = seed, dropout, progress, replicate
        self.to_device = to_device
        if not (isinstance(max_restarts, int) and max_restarts >= 0):
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        self.max_restarts = max_restarts
        self._amm_stopped = False
        self.out = Path(out) if out is not None else None
        self.stream = stream or sys.stdout
        self.epoch, self.step = 0, 0
        self.velocities = None
        self.log = []
        self.tasks_per_step = None
        self._inputs_placed = False
        self._elapsed = 0.0
        self._restart_point = None  # a _host_copy while run() trains

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_path(self, epoch):
        return self.out / f"checkpoint_epoch_{epoch}.npz"

    def save(self):
        """Write ``checkpoint_epoch_E.npz`` (E the epoch done) to ``out``."""
        self._save(self._host_copy())

    def _host_copy(self):
        """Host (NumPy) copies of the parameters, BatchNorm state and velocities, with the
        counters: what a checkpoint holds, and what :meth:`run` restarts from after a lost
        worker."""
        params, state, vel = dask.compute(self.model.params, self.model.state, self.velocities)
        return {
            "params": _to_host(params),
            "state": _to_host(state),
            "velocities": None if vel is None else _to_host(vel),
            "epoch": self.epoch,
            "step": self.step,
            "log": list(self.log),
            "elapsed": self._elapsed,
        }

    def _save(self, host):
        meta = {k: host[k] for k in ("epoch", "step", "log", "elapsed")}
        meta["seed"] = self.seed
        save_checkpoint(
            self.checkpoint_path(host["epoch"]), host["params"], host["state"], host["velocities"], meta
        )

    def _restore(self, host):
        """Back to a :meth:`_host_copy`: the parameters go to the cluster again with the next
        step (nothing computed after the copy survives a restart)."""
        self.model.params.update(host["params"])
        self.model.state.update(host["state"])
        self.velocities = None if host["velocities"] is None else dict(host["velocities"])
        self.epoch, self.step, self._elapsed = host["epoch"], host["step"], host["elapsed"]
        self.log = list(host["log"])
        self._inputs_placed = False  # the restored host arrays are placed again, as at the start

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
        params, state, vel, meta = load_checkpoint(path)
        check_velocities(vel, self.model.params, path)
        try:
            self.model.load_params(params, state)  # checks everything before it replaces anything
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {path}: {e.args[0] if e.args else e}") from e
        self.velocities = {k: v.astype(self.model.dtype, copy=False) for k, v in vel.items()}
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.log, self._elapsed = list(meta["log"]), float(meta.get("elapsed", 0.0))
        self._inputs_placed = False
        return True

    def _place_on_workers(self):
        """Scatter NumPy parameters and BatchNorm state to the cluster once, so that no step's
        graph carries them (at width 1 they are 60 MB); a no-op without a distributed client."""
        client = active_client()
        if client is None:
            return
        for store in (self.model.params, self.model.state):
            if any(isinstance(v, np.ndarray) for v in store.values()):
                store.update(scatter_arrays(store, client))

    def _to_dask(self, x, t, split):
        """:func:`~dask_pconv.batching.to_dask`, then ``to_device`` on every block if set."""
        return to_dask(x, t, split, to_device=self.to_device)

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
        m = self.model
        self._place_on_workers()
        xd, td = self._to_dask(x, t, self.split)
        params = m.dask_params(like=xd)
        if self.velocities is None:
            self.velocities = self.opt.init_state(params)
        vel = {k: m._as_dask(k, v, like=xd) for k, v in self.velocities.items()}
        if not self._inputs_placed:
            # Chunk and place the first step's inputs (scattered or checkpointed arrays, zero
            # velocities) in a graph of their own, as every later step finds them: otherwise
            # that step's graph carries this work too, and its task count, the one reported,
            # differs between a new run and a resumed one (issue 10).
            state = {k: m._as_dask(k, v, like=xd) for k, v in m.state.items()}
            params, vel, state = dask.persist(params, vel, state)
            m.params, self.velocities = dict(params), dict(vel)
            m.state.update(state)
            self._inputs_placed = True
        if self.replicate:
            self._amm_stopped |= replicate([params, vel, m.state])
            # Hold this step's inputs (now on every worker) until the next step has replicated
            # this step's outputs: a worker lost after the step finished, before that, loses
            # outputs that exist only there, and the scheduler recomputes them from these.
            self._replicated_inputs = (params, vel, dict(m.state))
        outs = training_step(m, self.opt, params, dict(m.state), vel, xd, td, self.step, self.dropout)
        if self.tasks_per_step is None:
            self.tasks_per_step = _count_tasks(outs)
        new_p, new_v, new_state, loss, acc = dask.persist(*outs)
        m.params, self.velocities = new_p, new_v
        m.state.update(new_state)
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

        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        # on every run, a resumed one too, whose rows would otherwise come without one
        print(format_row(LOG_KEYS), file=self.stream, flush=True)
        try:
            with _Interrupts() as interrupts:
                self._run_restarting(epochs, interrupts)
        finally:
            if self._amm_stopped:  # replicate=True stopped it: give the cluster its AMM back
                restart_memory_manager()
                self._amm_stopped = False
        return self.log

    def _run_restarting(self, epochs, interrupts):
        """:meth:`_run`, restarted from the end of the last complete epoch (or from where ``run``
        began) when a worker is lost with data nothing else can recompute."""
        self._restart_point = self._host_copy()
        restarts, restarted_at = 0, None
        while True:
            try:
                return self._run(epochs, interrupts)
            except lost_data_errors() as e:
                host = self._restart_point
                failed = host["epoch"] + 1  # the epoch it redoes
                # count per restart point: a long run survives occasional losses, while one
                # epoch that keeps losing workers ends
                restarts = restarts + 1 if host["epoch"] == restarted_at else 1
                restarted_at = host["epoch"]
                cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                if restarts > self.max_restarts:
                    last = self.latest_checkpoint()
                    times = "once" if restarts == 1 else f"{restarts} times"
                    raise WorkerLossError(
                        f"workers were lost {times} in epoch {failed}, more than max_restarts="
                        f"{self.max_restarts} allows ({cause})"
                        + (f"; the last complete checkpoint is {last}" if last else "")
                    ) from e
                self._restore(host)
                where = f"the end of epoch {host['epoch']}" if host["epoch"] else "the start of the run"
                where += f" (step {host['step']})"
                print(
                    f"a worker was lost in epoch {failed} ({cause}); restarting from {where}, "
                    f"restart {restarts} of at most {self.max_restarts}",
                    file=sys.stderr,
                    flush=True,
                )

    def _run(self, epochs, interrupts):
        from tqdm.auto import tqdm

        n = len(self.train_set.t)
        while self.epoch < epochs:
            t0 = time.perf_counter()
            batches = epoch_batches(n, self.batch_size, self.epoch, self.seed)
            losses, accs = [], []
            pending = None
            with tqdm(
                batches,
                desc=f"epoch {self.epoch + 1}/{epochs}",
                disable=not self.progress,
                leave=False,
                file=sys.stderr,
                unit="step",
            ) as bar:
                for idx in bar:
                    interrupts.check()
                    # submit step k, then fetch step k-1's scalars: the client builds the next
                    # graph while the workers run the previous one
                    x, t = self.train_set.x[idx], self.train_set.t[idx]
                    submitted = (self.step + 1, self.submit_step(x, t))
                    if pending is not None:
                        self._record(pending, losses, accs, bar)
                    pending = submitted
                if pending is not None:
                    self._record(pending, losses, accs, bar)
            interrupts.check()
            val_loss, val_acc = self.evaluate(self.val_set)
            self.epoch += 1
            self._elapsed += time.perf_counter() - t0
            entry = {
                "epoch": self.epoch,
                "iteration": self.step,
                "main/loss": float(np.mean(losses)),
                "main/accuracy": float(np.mean(accs)),
                "validation/main/loss": float(val_loss),
                "validation/main/accuracy": float(val_acc),
                "elapsed_time": round(self._elapsed, 3),
                "tasks_per_step": self.tasks_per_step,
            }
            self.log.append(entry)
            print(format_row([entry[k] for k in LOG_KEYS]), file=self.stream, flush=True)
            host = self._host_copy()
            if self.out is not None:
                self._save(host)
                self.write_log()
            self._restart_point = host

    def _record(self, pending, losses, accs, bar):
        step, pending = pending
        loss, acc = (float(v) for v in dask.compute(*pending))
        if not np.isfinite(loss):
            last = self.latest_checkpoint()
            raise FloatingPointError(
                f"the training loss is {loss} at step {step} (epoch {self.epoch + 1}): training "
                "diverged (try a lower learning rate); no checkpoint is written from it"
                + (f"; the last one is {last}" if last else "")
            )
        losses.append(loss)
        accs.append(acc)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")

    def write_log(self):
        """``log.json`` and the plots in ``out`` (:func:`dask_pconv.report.write_log`)."""
        write_log(self.out, self.log)


def _to_host(arrays):
    """NumPy copies of device arrays (:func:`~dask_pconv.backend.to_host`), name -> array."""
    return {k: to_host(v) for k, v in arrays.items()}


class _Interrupts:
    """SIGINT during :meth:`Trainer.run`.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, including inside
    distributed's garbage-collection callbacks, which swallow it and leave the client waiting.
    So the first Ctrl-C only sets a flag that the training loop checks between steps; a second
    one raises at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        msg = b"\ninterrupt: stopping after this step (Ctrl-C again to stop at once)\n"
        try:
            os.write(2, msg)  # not print(): the main thread may be inside a write to stderr
        except OSError:
            pass

    def check(self):
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _count_tasks(collections):
    """Tasks in the step's graph after Dask's blockwise fusion and culling.  Its linear fusion of
    task chains is left out: which chains it fuses changes from graph to graph of the same
    structure (seen with channel splits: 4 tasks in 1,500 up or down from step to step), and the
    aliases it leaves for fused keys are no tasks."""
    from dask.highlevelgraph import HighLevelGraph

    flat = [c for group in collections for c in (group.values() if isinstance(group, dict) else [group])]
    with dask.config.set({"optimization.fuse.active": False}):
        graphs = [c.__dask_graph__() for c in dask.optimize(*flat)]
    return len(HighLevelGraph.merge(*graphs).to_dict()) if graphs else 0
