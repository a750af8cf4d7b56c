"""The checkpoint format: an uncompressed ``.npz`` of the parameters, BatchNorm state and
optimizer velocities with a JSON ``meta`` (epoch, step, seed, log, ...) that carries a SHA-256
checksum of the arrays, written atomically and validated whole when it is read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["Snapshot", "check_velocities", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


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


class _Refused(ValueError):
    """A checkpoint field that fails its check; the message already names the file and field."""


def _read_member(zf, info, path, disk_size):
    """One ``.npy`` member of a checkpoint.  Its header is checked against the member's size
    before anything is allocated: a crafted header could declare terabytes."""
    name = info.filename
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Refused(
            f"checkpoint {path}: member {name!r} is compressed; checkpoints are written uncompressed"
        )
    if info.file_size > disk_size:  # stored: the data must be in the file
        raise _Refused(
            f"checkpoint {path}: member {name!r} claims {info.file_size} bytes, more than the file"
        )
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise _Refused(f"checkpoint {path}: member {name!r} has .npy format version {version}")
        if dtype.hasobject:
            raise _Refused(f"checkpoint {path}: member {name!r} holds Python objects ({dtype})")
        declared = dtype.itemsize * math.prod(shape)
        held = info.file_size - f.tell()
        if declared != held:
            raise _Refused(
                f"checkpoint {path}: member {name!r} declares a {dtype} array of shape {shape} "
                f"({declared} bytes) but holds {held} bytes"
            )
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def _check_meta(meta, path):
    """``meta`` as :meth:`Trainer.save` writes it, or a ``ValueError`` naming the field."""
    if not isinstance(meta, dict):
        raise _Refused(f"checkpoint {path}: meta must be a JSON object, got {type(meta).__name__}")
    for field in ("epoch", "step", "seed", "log"):
        if field not in meta:
            raise _Refused(f"checkpoint {path}: meta has no {field!r} field")

    def integer(v):  # JSON's true/false would pass isinstance(v, int)
        return isinstance(v, int) and not isinstance(v, bool)

    for field in ("epoch", "step"):
        if not (integer(meta[field]) and meta[field] >= 0):
            raise _Refused(f"checkpoint {path}: meta {field!r} must be an integer >= 0, got {meta[field]!r}")
    if not integer(meta["seed"]):
        raise _Refused(f"checkpoint {path}: meta 'seed' must be an integer, got {meta['seed']!r}")
    log = meta["log"]
    if not (isinstance(log, list) and all(isinstance(e, dict) for e in log)):
        raise _Refused(f"checkpoint {path}: meta 'log' must be a list of per-epoch objects")
    elapsed = meta.get("elapsed", 0.0)
    if not (isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and 0 <= elapsed < math.inf):
        raise _Refused(f"checkpoint {path}: meta 'elapsed' must be a finite number >= 0, got {elapsed!r}")


def load_checkpoint(path):
    """``(params, state, velocities, meta)`` from a checkpoint, loaded with ``allow_pickle=False``.

    Every field is checked before anything is returned, and any failure is a one-line
    ``ValueError`` naming the file and the field: a truncated, altered or foreign file (the
    checksum in ``meta`` must match the arrays), a member whose header declares more (or less)
    data than it holds, arrays that are not finite floating-point numbers, and ``meta`` that is
    not an object with integer ``epoch`` >= 0, ``step`` >= 0 and ``seed``, a list ``log`` and a
    finite ``elapsed`` >= 0.  Names and shapes are checked against the model by
    :meth:`Trainer.resume` (and :meth:`~dask_pconv.models.VGG16.load_params`).
    """
    out = {"param": {}, "state": {}, "velocity": {}}
    arrays = {}
    try:
        disk_size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            members = {}
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if key in members or key == info.filename:
                    raise ValueError(f"unexpected or repeated member {info.filename!r}")
                members[key] = _read_member(zf, info, path, disk_size)
    except _Refused:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"checkpoint {path} is unreadable or malformed: {e}") from e
    raw = members.pop("meta", None)
    if raw is None or raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"checkpoint {path} is unreadable or malformed: no 'meta' string")
    try:
        meta = json.loads(str(raw))
    except ValueError as e:
        raise _Refused(f"checkpoint {path}: meta is not JSON ({e})") from e
    _check_meta(meta, path)
    for key, a in members.items():
        prefix, _, name = key.partition("/")
        if prefix not in out or not name:
            raise ValueError(f"checkpoint {path} is unreadable or malformed: unexpected entry {key!r}")
        out[prefix][name] = arrays[key] = a
    if meta.get("sha256") != _checksum(arrays):
        raise ValueError(f"checkpoint {path} fails its checksum: altered or incomplete, not loading it")
    for key, a in arrays.items():
        if a.dtype.kind != "f":
            raise _Refused(f"checkpoint {path}: {key} must hold floating-point numbers, got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise _Refused(f"checkpoint {path}: {key} holds NaN or Inf")
    return out["param"], out["state"], out["velocity"], meta


def latest_checkpoint(folder):
    """The ``checkpoint_epoch_E.npz`` in ``folder`` with the highest E, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint_epoch_*.npz"):
        try:
            found.append((int(p.stem.rsplit("_", 1)[1]), p))
        except ValueError:
            continue
    return max(found)[1] if found else None


def check_velocities(velocities, params, path):
    """``ValueError`` naming ``path`` unless ``velocities`` has exactly the names of ``params``
    and each one's shape."""
    missing, extra = sorted(set(params) - set(velocities)), sorted(set(velocities) - set(params))
    if missing or extra:
        raise ValueError(
            f"checkpoint {path}: velocities do not match the parameters: "
            f"missing {missing}, unexpected {extra}"
        )
    for k, v in velocities.items():
        want = tuple(params[k].shape)
        if v.shape != want:
            raise ValueError(f"checkpoint {path}: velocity[{k!r}] has shape {v.shape}, expected {want}")


@dataclasses.dataclass
class Snapshot:
    """Host (NumPy) copies of everything a training run continues from: the parameters,
    running statistics and optimizer velocities with the counters.  What a checkpoint holds,
    and what the training loop goes back to after losing a worker."""

    params: dict
    state: dict
    velocities: dict | None
    epoch: int = 0
    step: int = 0
    log: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0

    @classmethod
    def take(cls, params, state, velocities, epoch, step, log, elapsed):
        """Compute the (lazy, possibly device) arrays and copy them to the host."""
        import dask

        from .backend import to_host

        params, state, velocities = dask.compute(params, state, velocities)
        host = lambda arrays: {k: to_host(v) for k, v in arrays.items()}  # noqa: E731
        vel = None if velocities is None else host(velocities)
        return cls(host(params), host(state), vel, epoch, step, list(log), elapsed)

    def save(self, path, seed):
        """Write it as a checkpoint (:func:`save_checkpoint`), ``seed`` in its meta."""
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "log": self.log,
            "elapsed": self.elapsed,
            "seed": seed,
        }
        save_checkpoint(path, self.params, self.state, self.velocities, meta)

    @classmethod
    def load(cls, path, params):
        """A checkpoint, validated whole (:func:`load_checkpoint`) and its velocities against
        ``params`` (names and shapes, :func:`check_velocities`): ``ValueError`` naming the
        file and the field otherwise."""
        p, state, vel, meta = load_checkpoint(path)
        check_velocities(vel, params, path)
        elapsed = float(meta.get("elapsed", 0.0))
        return cls(p, state, vel, meta["epoch"], meta["step"], list(meta["log"]), elapsed)
