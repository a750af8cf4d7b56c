"""The training loop: loss falls on a LocalCluster, checkpoints resume exactly, the CLI."""

import dataclasses
import io
import json
import sys
import types

import dask
import numpy as np
import pytest
from clusters import local_cluster
from distributed import Client

from dask_pconv import cli
from dask_pconv.cluster import connect
from dask_pconv.data import synthetic
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import LOG_KEYS, Trainer, load_checkpoint


@pytest.fixture(scope="module")
def small_data():
    return synthetic(n=80, n_classes=4, seed=1, val_fraction=0.25)


@pytest.mark.cluster
def test_steps_on_local_cluster_lower_the_loss(small_data):
    train, val = small_data
    with (
        local_cluster() as c,
        Client(c),
    ):
        m = VGG16(n_classes=4, width=0.125, seed=0)
        tr = Trainer(
            m,
            train,
            val,
            batch_size=20,
            split={"batch": 2},
            dropout=False,
            progress=False,
            optimizer=MomentumSGD(lr=0.01),
        )
        x, t = train.x[:20], train.t[:20]
        losses = [tr.train_step(x, t)[0] for _ in range(6)]
        assert losses[-1] < 0.7 * losses[0], losses
        assert all(isinstance(v, dask.array.Array) for v in m.params.values())  # persisted on workers
        assert tr.tasks_per_step > 0


def _trainer(data, out, **kw):
    train, val = data
    m = VGG16(n_classes=4, width=0.0625, seed=2)
    return Trainer(
        m, train, val, batch_size=20, split={"batch": 2}, out=out, progress=False, stream=io.StringIO(), **kw
    )


def test_resume_reaches_the_same_parameters(small_data, tmp_path):
    full = _trainer(small_data, tmp_path / "full")
    full.run(2)
    part = _trainer(small_data, tmp_path / "part")
    part.run(1)
    again = _trainer(small_data, tmp_path / "part")
    assert again.resume()
    assert (again.epoch, again.step) == (1, 3)
    again.run(2)
    p_full, p_again = dask.compute(full.model.params, again.model.params)
    for k in p_full:
        np.testing.assert_array_equal(p_full[k], p_again[k])
    assert [e["main/loss"] for e in again.log] == [e["main/loss"] for e in full.log]


def test_outputs_log_plots_and_checkpoints(small_data, tmp_path):
    tr = _trainer(small_data, tmp_path)
    tr.run(2)
    log = json.loads((tmp_path / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]
    assert set(LOG_KEYS) <= set(log[0])
    for png in ("loss.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    params, state, vel, meta = load_checkpoint(tmp_path / "checkpoint_epoch_2.npz")
    assert meta["epoch"] == 2 and meta["step"] == 6
    assert set(params) == set(tr.model.params) and set(state) == set(tr.model.state)
    header = tr.stream.getvalue().splitlines()[0]
    assert header.split() == list(LOG_KEYS)
    with np.load(tmp_path / "checkpoint_epoch_2.npz", allow_pickle=False) as f:
        assert "param/fc2.W" in f.files


def test_corrupt_checkpoint_is_a_clear_error(small_data, tmp_path):
    tr = _trainer(small_data, tmp_path)
    tr.run(1)
    path = tmp_path / "checkpoint_epoch_1.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="checkpoint .* unreadable or malformed"):
        _trainer(small_data, tmp_path).resume()


@pytest.mark.cluster
def test_cli_trains_and_writes_outputs(tmp_path, capsys):
    rc = cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--width",
            "0.0625",
            "--batch-size",
            "128",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--dashboard",
            "",
            "--report",
            str(tmp_path / "report.html"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation/main/accuracy" in out and "tasks per step" in out
    assert "step graph: stages;" in out  # the CLI's default split, batch:2, runs stages
    files = ("report.html", "report-summary.json", "report-summary.png")
    written = ", ".join(str(tmp_path / f) for f in files)
    assert f"performance report and per-operator summary: {written}\n" in out
    assert (tmp_path / "checkpoint_epoch_1.npz").exists() and (tmp_path / "log.json").exists()
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html.lower() and "Task Stream" in html
    summary = json.loads((tmp_path / "report-summary.json").read_text())
    # the CLI's default split (batch:2) runs stages (dask_pconv.stages.step)
    assert {"forward stages", "backward stages", "exchange", "optimizer"} <= set(summary["seconds"])
    assert (tmp_path / "report-summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "diagonal:2"], "split"),
        (["--epochs", "0"], "positive integer"),
        (["--width", "-1"], "positive number"),
        (["--dataset", "mnist"], "invalid choice"),
        (["--model", "resnet"], "unknown model 'resnet': choose vgg16, resnet18 or torch:MODULE:CALLABLE"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_altered_checkpoint_fails_its_checksum(small_data, tmp_path):
    tr = _trainer(small_data, tmp_path)
    tr.run(1)
    path = tmp_path / "checkpoint_epoch_1.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["param/fc2.W"] = arrays["param/fc2.W"] + 1e-3  # meta (and its checksum) unchanged
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="fails its checksum"):
        _trainer(small_data, tmp_path).resume()


@pytest.mark.cluster
def test_one_step_over_tls(small_data):
    from dask_pconv.cluster import connect

    train, val = small_data
    with connect(n_workers=2, threads_per_worker=1, security=True, dashboard_address=None) as client:
        assert client.scheduler.address.startswith("tls://")
        assert all(w.startswith("tls://127.0.0.1:") for w in client.scheduler_info()["workers"])
        m = VGG16(n_classes=4, width=0.0625, seed=0)
        tr = Trainer(m, train, val, batch_size=20, split={"batch": 2}, progress=False)
        loss, acc = tr.train_step(train.x[:20], train.t[:20])
        assert np.isfinite(loss) and 0 <= acc <= 1


def test_connect_rejects_a_bad_address():
    from dask_pconv.cluster import connect

    with pytest.raises(ValueError, match="scheduler address"):
        connect("not-an-address")


def test_task_names_map_to_operators():
    from dask_pconv.profiling import categorize

    assert categorize("conv2d-fwd-part") == "conv forward"
    assert categorize("conv2d-gxwin") == categorize("conv2d-gx") == "conv grad-x"
    assert categorize("conv2d-gw-part") == "conv grad-w"
    assert categorize("conv2d-halo-slice") == "halo slicing"
    assert categorize("sgd-velocity") == categorize("sgd-update") == "optimizer"
    assert categorize("step-fwd-1f") == categorize("step-last-1f") == "forward stages"
    assert categorize("step-bwd-1f") == "backward stages" and categorize("step-sums-1f") == "exchange"
    assert categorize("step-borders-1f") == categorize("step-strips-1f") == "exchange"
    assert categorize("step-velocity-fc1.W-1f") == categorize("step-param-fc1.W-1f") == "optimizer"
    assert categorize("from-array") == "other"


@pytest.mark.cluster
def test_worker_killed_during_or_after_a_step(small_data):
    """A worker process killed in the middle of step 2, or after step 2 finished (its outputs
    then live on one worker only): the step's loss and parameters come out bitwise those of the
    same step without the fault (dropout on: its masks are recomputed identically)."""
    import os
    import signal
    import time

    from distributed import wait

    train, val = small_data
    x1, t1, x2, t2 = train.x[:20], train.t[:20], train.x[20:40], train.t[20:40]
    with local_cluster() as c, Client(c) as client:

        def run(kill=None):
            m = VGG16(n_classes=4, width=0.125, seed=0)
            tr = Trainer(m, train, val, batch_size=20, split={"batch": 2}, progress=False, replicate=True)
            tr.train_step(x1, t1)
            loss, acc = tr.submit_step(x2, t2)
            pids = None
            if kill:
                pids = client.run(os.getpid)
                if kill == "during":
                    time.sleep(0.2)  # the step is running
                else:
                    wait([loss, *m.params.values()])  # the step is done
                victim = sorted(pids)[0]
                os.kill(pids[victim], signal.SIGKILL)
            loss, params = dask.compute(loss, m.params)
            if kill:  # the worker really died (its nanny started a new one, at a new address)
                client.wait_for_workers(2)
                assert victim not in client.run(os.getpid)
            return loss, params, pids

        loss0, p0, _ = run()
        for when in ("during", "after"):
            loss1, p1, pids = run(when)
            assert pids is not None and len(pids) == 2
            assert loss1 == loss0, when
            for k in p0:
                np.testing.assert_array_equal(p1[k], p0[k], err_msg=f"{when}: {k}")


def test_evaluate_splits_a_large_set_into_bounded_graphs(small_data):
    """The batches travel inside the graphs, so evaluation builds several graphs of at most
    ``eval_graph_bytes`` of images each; the result equals the one-graph result exactly."""
    from dask.callbacks import Callback

    train, _ = small_data
    tr = Trainer(VGG16(n_classes=4, width=0.0625, seed=0), train, train, batch_size=8, progress=False)

    class Graphs(Callback):
        def __init__(self):
            super().__init__()
            self.n = 0

        def _start(self, dsk):
            self.n += 1

    batch_bytes = 8 * train.x[:1].nbytes
    results = {}
    for per_graph, want_graphs in [(100, 1), (3, 3), (1, 8)]:  # 60 images: 8 batches
        tr.eval_graph_bytes = per_graph * batch_bytes
        with Graphs() as g:
            results[per_graph] = tr.evaluate(train)
        assert g.n == want_graphs
    assert results[3] == results[1] == results[100]
    tr.eval_graph_bytes = 1  # smaller than a batch: still one batch per graph
    with Graphs() as g:
        assert tr.evaluate(train) == results[1]
    assert g.n == 8


def _fake_dask_cuda(monkeypatch, calls):
    """dask-cuda 26.10's ``LocalCUDACluster`` signature and its first check, then an error as
    on a machine without a GPU: what ``connect(cuda=True)`` hands dask-cuda, tested without
    one."""
    mod = types.ModuleType("dask_cuda")

    def LocalCUDACluster(CUDA_VISIBLE_DEVICES=None, n_workers=None, threads_per_worker=1, **kwargs):
        if threads_per_worker < 1:  # dask-cuda's own check (None fails it with a TypeError)
            raise ValueError("threads_per_worker must be higher than 0.")
        calls.append(dict(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs))
        raise OSError("no GPU here (test stand-in)")

    mod.LocalCUDACluster = LocalCUDACluster
    monkeypatch.setitem(sys.modules, "dask_cuda", mod)


def test_cuda_cluster_gets_dask_cudas_defaults(monkeypatch, tmp_path, capsys):
    """``connect(cuda=True)`` and ``--cuda`` leave the number of workers and threads to
    dask-cuda (one worker per GPU, one thread) unless asked: the CLI's default of 2 workers
    would not start on a one-GPU machine."""
    calls = []
    _fake_dask_cuda(monkeypatch, calls)
    with pytest.raises(OSError, match="no GPU here"):
        connect(cuda=True)
    assert calls[-1]["n_workers"] is None and calls[-1]["threads_per_worker"] == 1
    assert calls[-1]["host"] == "127.0.0.1" and "dask_pconv._worker_init" in calls[-1]["preload"]
    with pytest.raises(OSError, match="no GPU here"):
        connect(cuda=True, n_workers=3, threads_per_worker=2)
    assert (calls[-1]["n_workers"], calls[-1]["threads_per_worker"]) == (3, 2)

    cupy = types.ModuleType("cupy")
    cupy.asarray = np.asarray
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    argv = ["train", "--dataset", "synthetic", "--cuda", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "starting the cluster: no GPU here" in capsys.readouterr().err
    assert calls[-1]["n_workers"] is None
    assert cli.main([*argv, "--workers", "1"]) == 2
    assert calls[-1]["n_workers"] == 1


@pytest.mark.cluster
def test_evaluating_the_batch_just_trained_on_completes(small_data):
    """With ``to_device``, a batch seen again (here: evaluated right after a full-batch step on
    it) once reused the keys of the step's graph, fused differently there, and the worker
    waited forever for a dependency of the earlier graph.  It completes, with the result of the
    synchronous scheduler (to rounding)."""
    import threading

    train, _ = small_data
    data = dataclasses.replace(train, x=train.x[:8], t=train.t[:8])

    def run():
        m = VGG16(n_classes=4, width=0.0625, seed=3)
        tr = Trainer(m, data, data, batch_size=8, split={"batch": 2}, progress=False, to_device=np.asarray)
        return tr.train_step(data.x, data.t), tr.evaluate(data)

    with dask.config.set(scheduler="synchronous"):
        want = run()
    got = []
    with local_cluster(n_workers=1) as c, Client(c):
        worker = threading.Thread(target=lambda: got.append(run()), daemon=True)
        worker.start()
        worker.join(120)
        assert got, "the evaluation did not finish within 120 s"
    # to rounding only: the synchronous scheduler runs BLAS (and PyTorch's kernels) with this
    # process's threads, the worker with one, and BLAS rounds by its thread count (docs/training.rst)
    (loss, acc), (val_loss, val_acc) = got[0]
    assert (acc, val_acc) == (want[0][1], want[1][1])
    np.testing.assert_allclose([loss, val_loss], [want[0][0], want[1][0]], rtol=1e-5)


def test_trainer_checks_its_split_and_reads_the_old_channel_key(small_data):
    train, val = small_data
    with pytest.raises(ValueError, match="batch:21 asks for more pieces than the 20 images"):
        Trainer(VGG16(n_classes=4, width=0.0625), train, val, batch_size=20, split={"batch": 21})
    with pytest.raises(ValueError, match="spatial:1x33 asks for more tiles"):
        Trainer(VGG16(n_classes=4, width=0.0625), train, val, batch_size=20, split={"spatial": (1, 33)})
    for key in ("out_channel", "channel"):  # "channel": the old name of the key
        m = VGG16(n_classes=4, width=0.0625)
        tr = Trainer(m, train, val, batch_size=20, split={key: 3})
        assert tr.split == {"out_channel": 3} and m.channel_split == 1  # the model is not changed
    with dask.config.set(scheduler="sync"):
        tr.train_step(train.x[:20], train.t[:20])
    # the trained parameters come chunked for the split: 3 pieces of output channels, the logits whole
    assert len(m.params["block1_1.conv.W"].chunks[0]) == 3 and len(m.params["fc1.W"].chunks[0]) == 3
    assert len(m.params["fc2.W"].chunks[0]) == 1 and len(tr.velocities["block1_1.conv.W"].chunks[0]) == 3
    assert tr.step_graph == "fine-grained: the parameters are split"  # model parallelism does not fuse


def test_every_step_counts_as_many_tasks_a_resumed_first_step_too(small_data, tmp_path):
    """The first step of a run (its inputs NumPy arrays, zero velocities or a checkpoint's)
    counts as many tasks as every later step, so a resumed run reports the same count."""
    train, val = small_data
    x, t = train.x[:20], train.t[:20]
    counts = []
    for resume in (False, True, True):
        m = VGG16(n_classes=4, width=0.0625, seed=2)
        tr = Trainer(m, train, val, batch_size=20, split={"batch": 2}, out=tmp_path, progress=False)
        if resume:
            tr.resume()
        tr.train_step(x, t)
        counts.append(tr.tasks_per_step)
        tr.save()  # checkpoint_epoch_0.npz: parameters and velocities after a step
    tr.tasks_per_step = None  # a step whose inputs are the previous step's results
    tr.train_step(x, t)
    assert counts == [tr.tasks_per_step] * 3


def test_a_segmentation_model_trains_on_per_pixel_labels_and_evaluates():
    """A fully convolutional model with (N, H, W) labels: steps on spatial tiles lower the
    per-pixel loss, and evaluation averages it over the validation images."""
    from dask_pconv.data import Dataset
    from dask_pconv.models import BatchNorm, Conv2d, Model, sequential

    rng = np.random.default_rng(3)
    x = rng.random((24, 1, 12, 12), dtype=np.float32)
    t = (x[:, 0] > 0.5).astype(np.int64)  # a threshold a 1x1 conv can learn
    program = sequential(
        ("conv", Conv2d(1, 4, 3, padding=1)), ("bn", BatchNorm(4, relu=True)), ("head", Conv2d(4, 2, 1))
    )
    train, val = Dataset(x[:16], t[:16], 2, "train"), Dataset(x[16:], t[16:], 2, "val")
    with dask.config.set(scheduler="synchronous"):
        tr = Trainer(
            Model(program, seed=0),
            train,
            val,
            batch_size=8,
            split="batch:2,spatial:2x2",
            progress=False,
            optimizer=MomentumSGD(lr=0.5),
        )
        losses = [tr.train_step(train.x[:8], train.t[:8])[0] for _ in range(10)]
        assert losses[-1] < 0.7 * losses[0], losses
        loss, acc = tr.evaluate(val)
    assert np.isfinite(loss) and 0 <= acc <= 1
