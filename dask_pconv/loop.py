"""The epoch loop of :meth:`Trainer.run <dask_pconv.train.Trainer.run>`: steps submitted one
ahead of their results, a progress bar, a log row, a snapshot and a checkpoint per epoch,
Ctrl-C at a step boundary, and a restart from the last complete epoch after a lost worker.

It drives a trainer through its public methods (``submit_step``, ``evaluate``, ``snapshot``,
``restore``, ``latest_checkpoint``, ``checkpoint_path``, ``write_log``) and counters.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import dask
import numpy as np

from ._client import lost_data_errors
from .batching import epoch_batches
from .report import LOG_KEYS, format_row

__all__ = ["WorkerLossError", "run_epochs"]


class WorkerLossError(RuntimeError):
    """Workers were lost in the same epoch more often than ``Trainer(max_restarts=...)``
    allows."""


def run_epochs(trainer, epochs):
    """Train ``trainer`` until ``epochs`` epochs are done (see :meth:`Trainer.run
    <dask_pconv.train.Trainer.run>`, whose contract this is)."""
    if trainer.out is not None:
        trainer.out.mkdir(parents=True, exist_ok=True)
    # on every run, a resumed one too, whose rows would otherwise come without one
    print(format_row(LOG_KEYS), file=trainer.stream, flush=True)
    with _Interrupts() as interrupts:
        _EpochLoop(trainer).run(epochs, interrupts)


def _progress(batches, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, disable=not enabled, leave=False, file=sys.stderr, unit="step")


class _EpochLoop:
    """The epochs of one :func:`run_epochs`, and the snapshot they restart from."""

    def __init__(self, trainer):
        self.tr = trainer
        self.restart_point = None  # a Snapshot: the end of the last complete epoch

    def run(self, epochs, interrupts):
        """:meth:`_run`, restarted from the end of the last complete epoch (or from where ``run``
        began) when a worker is lost with data nothing else can recompute."""
        tr = self.tr
        self.restart_point = tr.snapshot()
        restarts = _Restarts(tr.max_restarts)
        while True:
            try:
                return self._run(epochs, interrupts)
            except lost_data_errors() as e:
                snap = self.restart_point
                print(restarts.count(e, snap, tr.latest_checkpoint()), file=sys.stderr, flush=True)
                tr.restore(snap)

    def _run(self, epochs, interrupts):
        tr = self.tr

        n = len(tr.train_set.t)
        while tr.epoch < epochs:
            t0 = time.perf_counter()
            batches = epoch_batches(n, tr.batch_size, tr.epoch, tr.seed)
            losses, accs = [], []
            pending = None
            with _progress(batches, f"epoch {tr.epoch + 1}/{epochs}", tr.progress) as bar:
                for idx in bar:
                    interrupts.check()
                    # submit step k, then fetch step k-1's scalars: the client builds the next
                    # graph while the workers run the previous one
                    x, t = tr.train_set.x[idx], tr.train_set.t[idx]
                    submitted = (tr.step + 1, tr.submit_step(x, t))
                    if pending is not None:
                        self._record(pending, losses, accs, bar)
                    pending = submitted
                if pending is not None:
                    self._record(pending, losses, accs, bar)
            interrupts.check()
            val_loss, val_acc = tr.evaluate(tr.val_set)
            tr.epoch += 1
            tr.elapsed += time.perf_counter() - t0
            entry = {
                "epoch": tr.epoch,
                "iteration": tr.step,
                "main/loss": float(np.mean(losses)),
                "main/accuracy": float(np.mean(accs)),
                "validation/main/loss": float(val_loss),
                "validation/main/accuracy": float(val_acc),
                "elapsed_time": round(tr.elapsed, 3),
                "tasks_per_step": tr.tasks_per_step,
            }
            tr.log.append(entry)
            print(format_row([entry[k] for k in LOG_KEYS]), file=tr.stream, flush=True)
            snap = tr.snapshot()
            if tr.out is not None:
                snap.save(tr.checkpoint_path(tr.epoch), tr.seed)
                tr.write_log()
            self.restart_point = snap

    def _record(self, pending, losses, accs, bar):
        tr = self.tr
        step, pending = pending
        loss, acc = (float(v) for v in dask.compute(*pending))
        if not np.isfinite(loss):
            last = tr.latest_checkpoint()
            raise FloatingPointError(
                f"the training loss is {loss} at step {step} (epoch {tr.epoch + 1}): training "
                "diverged (try a lower learning rate); no checkpoint is written from it"
                + (f"; the last one is {last}" if last else "")
            )
        losses.append(loss)
        accs.append(acc)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")


class _Restarts:
    """How often :meth:`Trainer.run` went back to the same restart point, and what it says.

    Counted per restart point: a long run survives occasional losses, while one epoch that
    keeps losing workers ends in :class:`WorkerLossError`."""

    def __init__(self, max_restarts):
        self.max_restarts, self.restarts, self.point = max_restarts, 0, None

    def count(self, error, snap, last_checkpoint):
        """Count a restart to ``snap`` after ``error``; the line to print, or raise
        :class:`WorkerLossError` once there were more than ``max_restarts``."""
        failed = snap.epoch + 1  # the epoch it redoes
        self.restarts = self.restarts + 1 if snap.epoch == self.point else 1
        self.point = snap.epoch
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        if self.restarts > self.max_restarts:
            times = "once" if self.restarts == 1 else f"{self.restarts} times"
            raise WorkerLossError(
                f"workers were lost {times} in epoch {failed}, more than max_restarts="
                f"{self.max_restarts} allows ({cause})"
                + (f"; the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "")
            ) from error
        where = f"the end of epoch {snap.epoch}" if snap.epoch else "the start of the run"
        return (
            f"a worker was lost in epoch {failed} ({cause}); restarting from {where} (step {snap.step}), "
            f"restart {self.restarts} of at most {self.max_restarts}"
        )


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
