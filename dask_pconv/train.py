"""The training loop: one Dask graph per step (forward, backward, optimizer update), the
parameters persisted on the workers, only scalars back to the client; Chainer-style log
report, plots and per-epoch checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import dask
import numpy as np

from .cluster import _active_client, _scatter_arrays
from .data import check_split, epoch_batches, to_dask
from .optim import MomentumSGD

__all__ = ["LOG_KEYS", "Trainer", "load_checkpoint", "save_checkpoint"]

LOG_KEYS = (
    "epoch",
    "main/loss",
    "validation/main/loss",
    "main/accuracy",
    "validation/main/accuracy",
    "elapsed_time",
)


def _checksum(arrays):
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path, params, state, velocities, meta):
    """Write an ``.npz`` atomically (a temporary file in the same folder, then a rename).

    ``meta`` (JSON: epoch, step, ...) is stored with a SHA-256 checksum of all the arrays, which
    :func:`load_checkpoint` verifies.
    """
    path = Path(path)
    arrays = {}
    for prefix, group in (("param", params), ("state", state), ("velocity", velocities)):
        for k, v in group.items():
            arrays[f"{prefix}/{k}"] = np.asarray(v)
    arrays["meta"] = np.array(json.dumps(dict(meta, sha256=_checksum(arrays))))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """``(params, state, velocities, meta)`` from a checkpoint, loaded with ``allow_pickle=False``.

    A truncated, altered or foreign file raises ``ValueError`` naming it (the checksum in
    ``meta`` must match the arrays).
    """
    out = {"param": {}, "state": {}, "velocity": {}}
    arrays = {}
    try:
        # our own handle: np.load leaks its file when the zip is corrupt
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            for key in f.files:
                if key == "meta":
                    continue
                prefix, _, name = key.partition("/")
                if prefix not in out:
                    raise ValueError(f"unexpected entry {key!r}")
                out[prefix][name] = arrays[key] = f[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"checkpoint {path} is unreadable or malformed: {e}") from e
    if meta.get("sha256") != _checksum(arrays):
        raise ValueError(f"checkpoint {path} fails its checksum: altered or incomplete, not loading it")
    return out["param"], out["state"], out["velocity"], meta


def _format_row(values):
    return "".join(f"{v:<{max(len(k), 12) + 2}}" for k, v in zip(LOG_KEYS, values))


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
        self._amm_stopped = False
        self.out = Path(out) if out is not None else None
        self.stream = stream or sys.stdout
        self.epoch, self.step = 0, 0
        self.velocities = None
        self.log = []
        self.tasks_per_step = None
        self._inputs_placed = False
        self._elapsed = 0.0

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_path(self, epoch):
        return self.out / f"checkpoint_epoch_{epoch}.npz"

    def save(self):
        params, state, vel = dask.compute(self.model.params, self.model.state, self.velocities)
        params, state, vel = (_to_host(d) for d in (params, state, vel))
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "log": self.log,
            "elapsed": self._elapsed,
        }
        save_checkpoint(self.checkpoint_path(self.epoch), params, state, vel, meta)

    def latest_checkpoint(self):
        if self.out is None or not self.out.is_dir():
            return None
        found = []
        for p in self.out.glob("checkpoint_epoch_*.npz"):
            try:
                found.append((int(p.stem.rsplit("_", 1)[1]), p))
            except ValueError:
                continue
        return max(found)[1] if found else None

    def resume(self, path=None):
        """Continue from ``path`` or the newest checkpoint in ``out``; False if there is none."""
        path = path or self.latest_checkpoint()
        if path is None:
            return False
        params, state, vel, meta = load_checkpoint(path)
        self.model.load_params(params, state)
        self.velocities = {k: v for k, v in vel.items()}
        if set(self.velocities) != set(self.model.params):
            raise ValueError(f"checkpoint {path} has velocities for other parameters")
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.log, self._elapsed = list(meta["log"]), float(meta.get("elapsed", 0.0))
        self._inputs_placed = False
        return True

    def _place_on_workers(self):
        """Scatter NumPy parameters and BatchNorm state to the cluster once, so that no step's
        graph carries them (at width 1 they are 60 MB); a no-op without a distributed client."""
        client = _active_client()
        if client is None:
            return
        for store in (self.model.params, self.model.state):
            if any(isinstance(v, np.ndarray) for v in store.values()):
                store.update(_scatter_arrays(store, client))

    def _to_dask(self, x, t, split):
        """:func:`~dask_pconv.data.to_dask`, then ``to_device`` on every block if set."""
        xd, td = to_dask(x, t, split)
        if self.to_device is None:
            return xd, td
        # a new name per call: with a name hashed from the batch, a batch seen again (the same
        # images evaluated after training on them, or full-batch steps) reused the keys of an
        # earlier graph, which Dask's optimisation had fused differently there, and the
        # distributed worker then waited forever for the earlier graph's dependency
        return tuple(
            a.map_blocks(
                self.to_device,
                dtype=a.dtype,
                meta=self.to_device(a._meta),
                name=f"to-device-batch-{uuid.uuid4().hex}",
            )
            for a in (xd, td)
        )

    def _split_for(self, n):
        """The split for a batch of ``n`` (a short last batch gets at most ``n`` pieces)."""
        split = dict(self.split)
        if "batch" in split:
            split["batch"] = min(split["batch"], n)
        return split

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
            self._amm_stopped |= _replicate([params, vel, m.state])
            # Hold this step's inputs (now on every worker) until the next step has replicated
            # this step's outputs: a worker lost after the step finished, before that, loses
            # outputs that exist only there, and the scheduler recomputes them from these.
            self._replicated_inputs = (params, vel, dict(m.state))
        loss, grads, aux = m.forward_backward_aux(
            xd, td, train=True, dropout=self.dropout, step=self.step, params=params
        )
        new_p, new_v = self.opt.update(params, grads, vel)
        outs = (new_p, new_v, aux["state"], loss, aux["accuracy"])
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
        """Mean loss and accuracy in evaluation mode over ``dataset``, as floats.

        One graph per group of batches holding at most :attr:`eval_graph_bytes` of images (at
        least one batch per graph); the result does not depend on the grouping."""
        from .ops.nn import accuracy, softmax_cross_entropy

        n = len(dataset.t)
        batch_bytes = self.batch_size * dataset.x[:1].nbytes
        per_graph = max(1, self.eval_graph_bytes // max(1, batch_bytes))
        starts = range(0, n, self.batch_size)
        parts = []
        for g in range(0, len(starts), per_graph):
            graph = []
            for i in starts[g : g + per_graph]:
                x, t = dataset.x[i : i + self.batch_size], dataset.t[i : i + self.batch_size]
                xd, td = self._to_dask(x, t, self._split_for(len(t)))
                z = self.model.predict(xd)
                graph.append((softmax_cross_entropy(z, td) * len(td), accuracy(z, td) * len(td)))
            parts.extend(dask.compute(graph)[0])
        return float(sum(p[0] for p in parts) / n), float(sum(p[1] for p in parts) / n)

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
        """

        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        # on every run, a resumed one too, whose rows would otherwise come without one
        print(_format_row(LOG_KEYS), file=self.stream, flush=True)
        try:
            with _Interrupts() as interrupts:
                self._run(epochs, interrupts)
        finally:
            if self._amm_stopped:  # replicate=True stopped it: give the cluster its AMM back
                _active_client().amm.start()
                self._amm_stopped = False
        return self.log

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
            print(_format_row([_fmt(entry[k]) for k in LOG_KEYS]), file=self.stream, flush=True)
            if self.out is not None:
                self.save()
                self.write_log()

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
        tmp = self.out / f".log.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.log, indent=2))
        os.replace(tmp, self.out / "log.json")
        _plot(self.log, ["main/loss", "validation/main/loss"], self.out / "loss.png", "loss")
        _plot(self.log, ["main/accuracy", "validation/main/accuracy"], self.out / "accuracy.png", "accuracy")


def _to_host(arrays):
    """NumPy copies of device arrays (``.get()``, CuPy's explicit copy), name -> array."""
    return {k: v if isinstance(v, np.ndarray) else v.get() for k, v in arrays.items()}


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


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _replicate(collections):
    """Copy the persisted data behind these Dask arrays to every worker (if any).  Returns
    whether it stopped the scheduler's Active Memory Manager to do so."""
    client = _active_client()
    if client is None:
        return False
    from distributed import futures_of

    stopped = False
    futures = futures_of([v for group in collections for v in group.values()])
    if futures:
        if client.amm.running():
            # its ReduceReplicas policy would drop the copies again within seconds
            client.amm.stop()
            stopped = True
        client.replicate(futures)
    return stopped


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


def _plot(log, keys, path, ylabel):
    """A line plot per key over the epochs, written atomically; pyplot's global state (and the
    user's matplotlib backend) is left alone."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [e["epoch"] for e in log]
    for k in keys:
        ax.plot(epochs, [e[k] for e in log], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
