"""Faults and security: interrupting training, determinism, divergence, lost workers, and what a
new cluster listens on."""

import collections
import dataclasses
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import dask
import numpy as np
import psutil
import pytest
from clusters import local_cluster
from distributed import Client, default_client, futures_of, wait

from dask_pconv import cli
from dask_pconv.cluster import connect
from dask_pconv.data import synthetic
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer, WorkerLossError, load_checkpoint


@pytest.fixture(scope="module")
def small_data():
    return synthetic(n=80, n_classes=4, seed=1, val_fraction=0.25)


def _cli_argv(out, epochs):
    return [
        "train",
        "--dataset",
        "synthetic",
        "--width",
        "0.0625",
        "--batch-size",
        "206",
        "--epochs",
        str(epochs),
        "--workers",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--dashboard",
        "",
    ]


@pytest.mark.cluster
def test_sigint_keeps_the_last_checkpoint_and_resume_continues(tmp_path, capsys):
    """Ctrl-C in the middle of epoch 2: the run stops at the next step boundary with exit status
    130 and a message naming the checkpoint; the epoch-1 checkpoint is intact (its checksum
    verifies), no temporary file is left; ``--resume`` continues from epoch 1."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint_epoch_1.npz"
    cmd = [sys.executable, "-m", "dask_pconv.cli", *_cli_argv(out, epochs=50)]
    # its own process group, which gets the signal as a terminal's Ctrl-C does: the workers too
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # epoch 2 (50 epochs asked) has just begun
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted in epoch 2" in stderr and str(ckpt) in stderr and "--resume" in stderr
    # the workers ignored the signal: no task was cut short, nothing cancelled; and the cluster
    # closed quietly (a worker's heartbeat that raced with its shutdown logged a CommClosedError
    # traceback: https://github.com/dask/distributed/issues/7192): the acknowledgement and the
    # line that says how to continue, nothing else
    lines = [line for line in stderr.splitlines() if line]
    assert len(lines) == 2 and lines[0].startswith("interrupt: stopping after this step"), stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    params, state, vel, meta = load_checkpoint(ckpt)  # verifies the checksum
    assert (meta["epoch"], meta["step"]) == (1, 2)
    interrupted_log = meta["log"]

    assert cli.main([*_cli_argv(out, epochs=2), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from epoch 1 (step 2)" in text
    _, _, _, meta2 = load_checkpoint(out / "checkpoint_epoch_2.npz")
    assert (meta2["epoch"], meta2["step"]) == (2, 4)
    assert meta2["log"][0] == interrupted_log[0]  # epoch 1 was not redone


def _steps(data, split, n_steps, seed=0, dropout=True):
    train, val = data
    m = VGG16(n_classes=4, width=0.0625, seed=seed, channel_split=split.get("channel", 1))
    tr = Trainer(
        m,
        train,
        val,
        batch_size=20,
        split=split,
        seed=seed,
        dropout=dropout,
        progress=False,
        optimizer=MomentumSGD(lr=0.01),
    )
    losses = [
        tr.train_step(train.x[20 * i : 20 * i + 20], train.t[20 * i : 20 * i + 20])[0] for i in range(n_steps)
    ]
    return losses, dask.compute(m.params)[0]


# same seed and split, same bits (repeated runs on 2 and 3 workers): tests/test_reproducible.py


def test_other_splits_agree_within_rounding(small_data):
    """Batch, spatial and channel splits sum in different orders: after 2 steps (dropout on) the
    losses and parameters agree to float32 rounding."""
    loss_a, p_a = _steps(small_data, {"batch": 2}, 2)
    for split in ({"spatial": (2, 2)}, {"channel": 2}):
        loss_s, p_s = _steps(small_data, split, 2)
        np.testing.assert_allclose(loss_s, loss_a, rtol=1e-4, err_msg=str(split))
        for k in p_a:
            scale = np.abs(p_a[k]).max() + 1e-6
            np.testing.assert_allclose(p_s[k], p_a[k], rtol=0, atol=2e-4 * scale, err_msg=f"{split} {k}")


def test_nan_in_the_data_stops_training_with_a_clear_error(small_data, tmp_path):
    """NaN propagates through every op (documented); the trainer stops at the first non-finite
    loss and writes no checkpoint from it."""
    train, val = small_data
    x = train.x.copy()
    x[3, 0, 5, 5] = np.nan
    bad = dataclasses.replace(train, x=x)
    m = VGG16(n_classes=4, width=0.0625, seed=0)
    tr = Trainer(
        m, bad, val, batch_size=20, split={"batch": 2}, out=tmp_path, progress=False, stream=io.StringIO()
    )
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step \d"):
        tr.run(1)
    assert not list(tmp_path.glob("*.npz"))


def _listening(pid):
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.cluster
@pytest.mark.parametrize("dashboard", ["127.0.0.1:0", None])
def test_a_new_cluster_listens_on_loopback_only(dashboard):
    """Every socket the scheduler and the nannies (in this process) and the worker processes
    listen on is bound to 127.0.0.1, with the dashboard on and off."""
    before = _listening(os.getpid())
    with connect(n_workers=2, threads_per_worker=1, dashboard_address=dashboard) as client:
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        sockets = {"scheduler and nannies": _listening(os.getpid()) - before}
        sockets.update({f"worker {p}": _listening(p) for p in pids.values()})
        # scheduler comm + its HTTP server + one per nanny, and each worker's comm
        assert len(sockets["scheduler and nannies"]) >= 4, sockets
        assert all(sockets.values()), sockets
        for who, socks in sockets.items():
            assert {ip for ip, _ in socks} == {"127.0.0.1"}, (who, socks)
        if dashboard:
            assert client.dashboard_link.startswith("http://127.0.0.1:")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
@pytest.mark.parametrize("form", [":0", ":PORT", "PORT", "0.0.0.0:PORT"])
def test_a_dashboard_port_without_a_host_listens_on_loopback(form):
    """``dashboard_address=":8799"`` (or ``":0"``, or a bare port) listens on 127.0.0.1, as every
    other socket of a cluster started here; distributed alone binds it on every interface.  A
    host the user names (``"0.0.0.0:8799"``) is taken as given."""
    port = _free_port() if "PORT" in form else 0
    address = form.replace("PORT", str(port))
    before = _listening(os.getpid())
    with connect(n_workers=1, threads_per_worker=1, dashboard_address=address) as client:
        link_port = int(client.dashboard_link.split(":")[2].split("/")[0])
        assert link_port == port or port == 0
        dashboard = {(ip, p) for ip, p in _listening(os.getpid()) - before if p == link_port}
    want = "0.0.0.0" if form.startswith("0.0.0.0") else "127.0.0.1"
    assert dashboard == {(want, link_port)}


@pytest.mark.cluster
def test_cli_dashboard_port_listens_on_loopback(tmp_path, monkeypatch):
    """``dask-pconv train --dashboard :PORT`` serves the dashboard on 127.0.0.1:PORT only."""
    port = _free_port()
    seen = []
    before = _listening(os.getpid())

    def run(self, epochs):  # the cluster is up: look at its sockets instead of training
        seen.append(_listening(os.getpid()) - before)
        return []

    monkeypatch.setattr(Trainer, "run", run)
    argv = _cli_argv(tmp_path, epochs=1)
    argv[argv.index("--dashboard") + 1] = f":{port}"
    assert cli.main(argv) == 0
    assert {(ip, p) for ip, p in seen[0] if p == port} == {("127.0.0.1", port)}


_UNREACHABLE = """
import sys, threading, time
import dask
sys.path.insert(0, sys.argv[1])  # the tests' folder
from clusters import local_cluster
from dask_pconv.cluster import connect

def loops():
    return sum(t.name == "IO loop" and t.is_alive() for t in threading.enumerate())

with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
    try:
        connect("tcp://127.0.0.1:1")
    except OSError as e:
        print("ERROR:", e)
deadline = time.monotonic() + 10
while loops() and time.monotonic() < deadline:
    time.sleep(0.05)
print("LOOPS LEFT:", loops())
# the process can still start a cluster of its own
with local_cluster(n_workers=1, processes=False) as c:
    print("STARTED:", len(c.workers))
"""


def test_connect_names_an_unreachable_scheduler():
    """A clear error, and nothing left running: the failed client's event-loop thread stops,
    and the same process then starts a cluster of its own.  In a fresh process, so that what
    a failed connection leaves behind cannot reach the other tests."""
    tests = str(pathlib.Path(__file__).parent)
    cmd = [sys.executable, "-c", _UNREACHABLE, tests]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ERROR: could not connect to the scheduler at 'tcp://127.0.0.1:1'" in out, out
    assert "join timed out" not in out, out
    assert "LOOPS LEFT: 0" in out and "STARTED: 1" in out, out


@pytest.mark.cluster
def test_replicate_gives_the_cluster_its_memory_manager_back(small_data):
    """replicate=True stops the Active Memory Manager while training (its ReduceReplicas
    policy would drop the copies) and ``run`` starts it again when it returns."""
    train, val = small_data
    with local_cluster() as c, Client(c) as client:
        assert client.amm.running()
        m = VGG16(n_classes=4, width=0.0625, seed=0)
        tr = Trainer(m, train, val, batch_size=20, split={"batch": 2}, progress=False, replicate=True)
        tr.submit_step(train.x[:20], train.t[:20])
        assert not client.amm.running()
        tr.run(1)
        assert client.amm.running()
        assert len(tr.log) == 1 and np.isfinite(tr.log[0]["main/loss"])


def _kill_a_worker_holding(arrays):
    """SIGKILL the worker process that holds most chunks of these persisted arrays."""
    client = default_client()
    futures = futures_of(list(arrays.values()))
    wait(futures)  # the step that computes them may still be running
    who = client.who_has(futures)
    victim = collections.Counter(w for ws in who.values() for w in ws).most_common(1)[0][0]
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)


def _kill_after_submitting(monkeypatch, calls):
    """From now on, ``Trainer.submit_step`` kills a worker right after its calls number ``calls``
    (counting from 1, restarts included) have handed their step to the scheduler: the worker
    holding most of the previous step's parameters, which nothing else can recompute."""
    submit, n = Trainer.submit_step, []

    def killing_submit(self, x, t):
        previous = dict(self.model.params)
        out = submit(self, x, t)
        n.append(1)
        if len(n) in calls:
            _kill_a_worker_holding(previous)
        return out

    monkeypatch.setattr(Trainer, "submit_step", killing_submit)


@pytest.mark.cluster
def test_a_worker_lost_without_replicate_restarts_from_the_last_epoch(monkeypatch, capsys):
    """Without ``replicate``, a worker killed in the middle of a step takes parameters nothing
    can recompute.  Training restarts from the last complete epoch (here once from the start of
    the run, in epoch 1, and once from the end of epoch 1, in epoch 2), says so on one line of
    standard error each time, and ends bitwise where a run without the faults ends (dropout on,
    2 workers).  Workers lost more often than ``max_restarts`` end in ``WorkerLossError``."""
    train, val = synthetic(n=32, n_classes=4, seed=1, val_fraction=0.25)  # 2 steps per epoch

    def run(epochs=2, **kw):
        m = VGG16(n_classes=4, width=0.0625, seed=0)
        tr = Trainer(
            m, train, val, batch_size=12, split={"batch": 2}, progress=False, stream=io.StringIO(), **kw
        )
        tr.run(epochs)
        return tr, dask.compute(m.params, m.state, tr.velocities)

    with local_cluster() as c, Client(c) as client:
        tr0, want = run()
        assert not [line for line in capsys.readouterr().err.splitlines() if "worker was lost" in line]
        _kill_after_submitting(monkeypatch, {2, 6})  # step 2 of epoch 1, step 2 of epoch 2
        tr1, got = run()
        lost = [line for line in capsys.readouterr().err.splitlines() if "worker was lost" in line]
        assert len(lost) == 2, lost
        assert "in epoch 1" in lost[0] and "restarting from the start of the run (step 0)" in lost[0]
        assert "in epoch 2" in lost[1] and "restarting from the end of epoch 1 (step 2)" in lost[1]
        for group_want, group_got in zip(want, got):
            for k in group_want:
                np.testing.assert_array_equal(group_got[k], group_want[k], err_msg=k)
        losses = [(e["main/loss"], e["validation/main/loss"]) for e in tr1.log]
        assert losses == [(e["main/loss"], e["validation/main/loss"]) for e in tr0.log]

        client.wait_for_workers(2)
        _kill_after_submitting(monkeypatch, {2})
        with pytest.raises(
            WorkerLossError, match=r"workers were lost once in epoch 1, more than max_restarts=0"
        ):
            run(epochs=1, max_restarts=0)


@pytest.mark.cluster
def test_cli_survives_a_lost_worker(tmp_path, monkeypatch, capsys):
    """``dask-pconv train`` (no ``--replicate``) with a worker killed in the middle of a step:
    one line on standard error says it restarts, and training finishes with exit status 0."""
    _kill_after_submitting(monkeypatch, {2})
    argv = _cli_argv(tmp_path, epochs=1)
    argv[argv.index("--workers") + 1] = "2"
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    lost = [line for line in err.splitlines() if "worker was lost" in line]
    assert len(lost) == 1 and "restarting from the start of the run (step 0)" in lost[0], err
    assert "Traceback" not in err
    _, _, _, meta = load_checkpoint(tmp_path / "checkpoint_epoch_1.npz")
    assert meta["epoch"] == 1


def test_cli_workers_lost_too_often_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """``WorkerLossError`` from training ends the command with exit status 1 and one line."""

    def run(self, epochs):
        raise WorkerLossError("workers were lost 4 times in epoch 1, more than max_restarts=3 allows")

    monkeypatch.setattr(Trainer, "run", run)
    assert cli.main(_cli_argv(tmp_path, epochs=1)) == 1
    err = capsys.readouterr().err
    want = "dask-pconv train: error: workers were lost 4 times in epoch 1, more than max_restarts=3 allows"
    assert err.strip() == want


def _malloc_environ():
    names = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS")
    return {k: os.environ.get(k) for k in names}


@pytest.mark.cluster
def test_workers_of_a_cluster_started_here_keep_glibcs_mmap_threshold_off_small_arrays(monkeypatch):
    """distributed's MALLOC_TRIM_THRESHOLD_ alone would pin glibc's mmap threshold at 128 KiB
    (every large temporary a fresh mmap: a VGG16 step 1.7x slower); the workers get both
    thresholds at 64 MiB, and the one BLAS thread the bitwise results rely on."""
    from dask_pconv.cluster import WORKER_MALLOC

    before = dask.config.get("distributed.nanny.pre-spawn-environ")
    # as an earlier cluster of distributed's own leaves this process's environment
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(before["MALLOC_TRIM_THRESHOLD_"]))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with connect(n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        (env,) = client.run(_malloc_environ).values()
    assert env == {**WORKER_MALLOC, "OMP_NUM_THREADS": "1"}
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before  # set only while starting
