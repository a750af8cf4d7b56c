"""The ``dask-pconv`` command line: what it refuses before starting anything, its help, the
messages of a resumed or interrupted run, and the files a fresh clone should not track."""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import optional
import pytest
from clusters import local_cluster

from dask_pconv import cli, profiling
from dask_pconv.models import ResNet18

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*argv):
    """``dask-pconv`` in this process: (exit status, standard output, standard error)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if the command gets as far as starting or connecting to a cluster."""

    def connect(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr("dask_pconv.cluster.connect", connect)


@pytest.mark.parametrize(
    "split, match",
    [
        ("batch:100", r"--split: batch:100 asks for more pieces than the 64 images of a batch$"),
        ("spatial:64x64", r"--split: spatial:64x64 asks for more tiles than an image has pixels \(32x32\)"),
        ("batch:2,spatial:33", r"--split: spatial:33x33 asks for more tiles"),
    ],
)
def test_a_split_that_does_not_fit_is_refused_before_anything_starts(split, match, no_cluster):
    rc, out, err = _run("train", "--dataset", "synthetic", "--batch-size", "64", "--split", split)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and re.search(match, err.strip()), err
    assert err.startswith("dask-pconv train: error: ") and out == ""


def _help_entries(text):
    """Option -> its help text, from ``--help`` output (an entry starts with two spaces and a
    dash; its help follows the option after two or more spaces, or on the next lines)."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            entries[current] = rest.strip()
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_train_help_gives_every_option_a_help_and_its_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    rc, out, _ = _run("train", "--help")
    assert rc == 0
    entries = _help_entries(out)
    options = argparse.ArgumentParser(add_help=False)
    cli._train_options(options)
    assert set(entries) == {"-h"} | {a.option_strings[0] for a in options._actions}  # all listed
    entries.pop("-h")
    for option, text in entries.items():
        assert text, f"{option} has no help"
        assert text.count("default") == 1, f"{option}: {text!r}"
    assert "(default: batch:2)" in entries["--split"]  # the spec, not the parsed dict
    assert "runs their code: name only files you trust" in entries["--model"]
    assert "spatial:N means NxN" in entries["--split"]
    assert "out_channel:N (the weights' output channels)" in entries["--split"]


def test_the_old_channel_spelling_warns_on_one_line_and_means_output_channels(capsys):
    args = cli.build_parser().parse_args(["train", "--split", "batch:2,channel:4"])
    assert args.split == {"batch": 2, "out_channel": 4}
    err = capsys.readouterr().err
    assert err == (
        "dask-pconv train: warning: --split: split part 'channel:4': 'channel:N' is the old spelling "
        "of 'out_channel:N' (the weights' output channels, not dask_pconv.split's input channels); "
        "read as 'out_channel:4'\n"
    )
    assert cli.build_parser().parse_args(["train", "--split", "out_channel:4"]).split == {"out_channel": 4}
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--epochs", "7", "--out", "my run", "--split", "out_channel:2,spatial:2", "--lr", "0.01"],
        ["--no-dropout", "--replicate", "--dashboard", "", "--seed", "3", "--width", "0.125"],
        ["--dropout", "--resume", "--batch-size", "32", "--dataset", "cifar10", "--data-dir", "/d"],
        ["--model", "resnet18", "--width", "0.5"],
    ],
)
def test_the_command_line_of_a_run_gives_the_same_run(argv):
    parser = cli.build_parser()
    args = parser.parse_args(["train", *argv])
    words = shlex.split(cli._command_line(args))
    assert words[:2] == ["dask-pconv", "train"]
    assert vars(parser.parse_args(words[1:])) == vars(args)


class _RecordingClient:
    """What ``connect`` returns, standing in for a client of a cluster with two workers."""

    dashboard_link = "http://127.0.0.1:8787/status"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        pass

    def scheduler_info(self):
        return {"workers": {"tcp://127.0.0.1:1": {}, "tcp://127.0.0.1:2": {}}}


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Run the command against stand-ins of ``connect`` and ``Trainer`` that record what they
    are given: ``connect``'s arguments, the Trainer's arguments and ``run``'s epochs."""
    calls = {}

    def connect(*args, **kwargs):
        calls["connect"] = (args, kwargs)
        return _RecordingClient()

    class Trainer:
        def __init__(self, model, train_set, val_set, **kwargs):
            calls["trainer"] = dict(model=model, train_set=train_set, val_set=val_set, **kwargs)
            self.epoch, self.step, self.log, self.tasks_per_step = 0, 0, [], None

        def run(self, epochs):
            calls["epochs"] = epochs
            if calls.get("interrupt"):
                raise KeyboardInterrupt
            return []

        def latest_checkpoint(self):
            return None

    monkeypatch.setattr("dask_pconv.cluster.connect", connect)
    monkeypatch.setattr("dask_pconv.train.Trainer", Trainer)
    monkeypatch.chdir(tmp_path)
    return calls


_DEFAULTS = dict(
    connect=(
        (None,),
        dict(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0", security=None, cuda=False),
    ),
    trainer=dict(
        batch_size=64, split={"batch": 2}, seed=0, out="result", dropout=False, progress=True, replicate=False
    ),
    optimizer=(0.02, 0.9, 5e-4),
    model=dict(width=0.25, seed=0, dtype="float32"),
    epochs=5,
    summary="digits: 1438 train / 359 validation; split batch:2; lr 0.02, dropout off; 2 workers; "
    "dashboard http://127.0.0.1:8787/status",
)
_GIVEN = dict(
    connect=(
        (None,),
        dict(n_workers=3, threads_per_worker=2, dashboard_address=None, security=True, cuda=False),
    ),
    trainer=dict(
        batch_size=32,
        split={"spatial": (2, 2)},
        seed=4,
        out="run",
        dropout=True,
        progress=False,
        replicate=True,
    ),
    optimizer=(0.01, 0.5, 0.0),
    model=dict(width=0.125, seed=4, dtype="float64"),
    epochs=3,
    summary="lr 0.01, dropout on; 2 workers; dashboard off",
)
_SCHEDULER = dict(
    _DEFAULTS,
    connect=(("tcp://10.0.0.1:8786",), _DEFAULTS["connect"][1]),
    trainer=dict(_DEFAULTS["trainer"], split={"batch": 4}),
    summary="split batch:4; lr 0.02, dropout off; 2 workers; dashboard http://127.0.0.1:8787/status",
)
_RESNET = dict(
    _DEFAULTS,
    model=dict(width=0.125, seed=0, dtype="float32"),
    network=("ResNet18", "ResNet-18"),
)
_GIVEN_ARGV = (
    "--width 0.125 --epochs 3 --batch-size 32 --lr 0.01 --momentum 0.5 --weight-decay 0 --split spatial:2 "
    "--workers 3 --threads-per-worker 2 --dashboard= --replicate --tls --out run --seed 4 --dropout "
    "--dtype float64 --no-progress"
)


@pytest.mark.parametrize(
    "argv, want",
    [
        ("train", _DEFAULTS),
        (f"train {_GIVEN_ARGV}", _GIVEN),
        # an existing scheduler: the new cluster's options are passed on unchanged (connect ignores
        # them), and the summary names the scheduler's dashboard
        (
            "--dataset synthetic --split batch:4 --scheduler tcp://10.0.0.1:8786",
            _SCHEDULER,
        ),
        ("train --model resnet18 --width 0.125", _RESNET),
    ],
    ids=["defaults", "every option given", "scheduler", "resnet18"],
)
def test_each_option_reaches_the_cluster_the_model_and_the_trainer(argv, want, recorded, capsys):
    """Every option's value, given or its default, arrives where it acts, and the run's first
    line says what runs."""
    assert cli.main(shlex.split(argv)) == 0, capsys.readouterr().err
    assert recorded["connect"] == want["connect"]
    trainer = recorded["trainer"]
    assert {k: trainer[k] for k in want["trainer"]} == want["trainer"]
    assert trainer["to_device"] is None and trainer["stream"] is sys.stdout
    opt = trainer["optimizer"]
    assert (opt.lr, opt.momentum, opt.weight_decay) == want["optimizer"]
    model, images = trainer["model"], trainer["train_set"]
    assert dict(width=model.width, seed=model.seed, dtype=str(model.dtype)) == want["model"]
    assert (model.n_classes, model.in_channels) == (images.n_classes, images.x.shape[1])
    assert recorded["epochs"] == want["epochs"]
    cls, network = want.get("network", ("VGG16", "VGG16"))
    assert type(model).__name__ == cls
    out = capsys.readouterr().out
    assert out.startswith(f"{network} width {model.width}: {model.n_params:,} parameters; ")
    assert out.endswith(f"{want['summary']}\n") and out.count("\n") == 1


def test_an_interrupt_before_the_first_checkpoint_says_how_to_start_again(recorded):
    recorded["interrupt"] = True
    rc, out, err = _run("--dataset", "synthetic", "--epochs", "3", "--out", "my run")
    assert rc == 130
    assert err == (
        "\ninterrupted in epoch 1 (after step 0); no epoch was complete, so there is no checkpoint "
        "yet; start again with: dask-pconv train --dataset synthetic --epochs 3 --out 'my run'\n"
    )


def test_an_interrupt_before_training_begins_is_one_line(recorded, monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C while the data loads
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_dataset", interrupted)
    rc, out, err = _run("--dataset", "synthetic")
    assert rc == 130
    assert err == "dask-pconv train: interrupted before training began\n" and out == ""


@pytest.mark.cluster
def test_resume_messages_header_and_tasks_per_step(tmp_path, monkeypatch):
    """One in-process cluster for four runs of the command: a --resume with nothing to resume
    says so; a resumed run prints the table's header and the same tasks-per-step count as the
    first run; a --resume with nothing left to do says training is complete; Ctrl-C prints a
    command that continues the same run (--epochs included)."""
    out = tmp_path / "run"
    with local_cluster(n_workers=1, processes=False) as cluster:
        base = ["train", "--scheduler", cluster.scheduler_address, "--out", str(out), "--no-progress"]
        base += ["--dataset", "synthetic", "--width", "0.0625", "--batch-size", "200", "--split", "batch:2"]
        rc, first, err = _run(*base, "--epochs", "1", "--resume")
        assert rc == 0, err
        assert f"nothing to resume: no checkpoint in {out}; starting from epoch 1" in first
        rc, again, err = _run(*base, "--epochs", "2", "--resume")
        assert rc == 0, err
        assert "resumed from epoch 1 (step 2)" in again
        header = next(line for line in again.splitlines() if line.startswith("epoch"))
        assert header.split()[:2] == ["epoch", "main/loss"]
        tasks = [re.search(r"tasks per step: (\d+);", text).group(1) for text in (first, again)]
        assert tasks[0] == tasks[1]
        rc, done, err = _run(*base, "--epochs", "2", "--resume")
        assert rc == 0, err
        assert f"training is already complete: {out} holds epoch 2 and --epochs is 2" in done
        assert "tasks per step" not in done

        def interrupted(self, epochs):
            raise KeyboardInterrupt

        monkeypatch.setattr("dask_pconv.train.Trainer.run", interrupted)
        rc, _, err = _run(*base, "--epochs", "9", "--resume", "--seed", "0", "--lr", "0.01")
    assert rc == 130
    hint = err.strip().splitlines()[-1]
    assert f"the last complete checkpoint is {out / 'checkpoint_epoch_2.npz'}; continue with: " in hint
    command = shlex.split(hint.split("continue with: ", 1)[1])
    assert command[0] == "dask-pconv"
    continued = cli.build_parser().parse_args(command[1:])
    assert (continued.epochs, continued.lr, continued.out, continued.resume) == (9, 0.01, str(out), True)


@pytest.mark.cluster
def test_resnet18_trains_from_the_command_line(tmp_path):
    """``--model resnet18``: a short real run on an in-process cluster, its first line naming
    the network, a validation row in the log and a checkpoint of ResNet-18's parameters."""
    with local_cluster(n_workers=1, processes=False) as cluster:
        rc, out, err = _run(
            *("train", "--model", "resnet18", "--dataset", "synthetic", "--width", "0.0625"),
            *("--batch-size", "256", "--epochs", "1", "--scheduler", cluster.scheduler_address),
            *("--out", str(tmp_path), "--no-progress"),
        )
    assert rc == 0, err
    first = out.splitlines()[0]
    n_params = ResNet18(width=0.0625).n_params
    assert first.startswith(f"ResNet-18 width 0.0625: {n_params:,} parameters; synthetic: 412 train / 100 ")
    log = json.loads((tmp_path / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1] and 0 <= log[0]["validation/main/accuracy"] <= 1
    with np.load(tmp_path / "checkpoint_epoch_1.npz") as saved:
        assert any("layer4.1.conv2.W" in k for k in saved.files)


def test_report_paths_are_the_files_profile_writes():
    assert [str(p) for p in profiling.report_paths("out/report.html")] == [
        "out/report.html",
        "out/report-summary.json",
        "out/report-summary.png",
    ]


def _gitignore():
    path = ROOT / ".gitignore"
    if not path.exists():
        pytest.skip("no .gitignore: not a git checkout (run the tests from a clone to check it)")
    return path.read_text().split()


def test_the_default_output_folders_are_ignored_by_git():
    default_out = cli.build_parser().parse_args(["train"]).out
    assert f"{default_out}/" in _gitignore()
    assert "result-vgg16/" in _gitignore()  # examples/vgg16_model_parallel.py's --out


def test_every_docs_page_is_in_the_table_of_contents():
    docs = ROOT / "docs"
    if not (docs / "index.rst").exists():
        pytest.skip("no docs/ folder: not a source checkout")
    index = (docs / "index.rst").read_text()
    toctree = re.search(r"\.\. toctree::\n((?:\s+.*\n)+)", index).group(1).split()
    pages = {p.stem for p in docs.iterdir() if p.suffix in (".rst", ".md") and p.stem != "index"}
    assert pages <= set(toctree), sorted(pages - set(toctree))


def test_the_large_image_example_says_what_its_error_is_relative_to():
    path = ROOT / "examples" / "conv_large_image.py"
    if not path.exists():
        pytest.skip("no examples/ folder: not a source checkout")
    spec = importlib.util.spec_from_file_location("conv_large_image", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.difference_line(1.2e-6, 1.79) == "max |difference| 1.2e-06, relative to max |y|: 6.7e-07"


def test_the_unet_example_is_exact_where_naive_tiles_are_not(tmp_path, capsys):
    """examples/unet_tiles.py at a small size: our tiles equal the module on the whole image,
    the naive tiles do not, and the figure is written."""
    optional.need_torch()
    pytest.importorskip("skimage", reason="needs scikit-image: pip install -e '.[examples]'")
    path = ROOT / "examples" / "unet_tiles.py"
    if not path.exists():
        pytest.skip("no examples/ folder: not a source checkout")
    spec = importlib.util.spec_from_file_location("unet_tiles", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--scale", "1", "--tile", "128", "--steps", "2", "--out", str(tmp_path / "u.png")])
    out = capsys.readouterr().out
    ours = float(out.split("max |ours - whole module|:")[1].split()[0])
    naive = float(out.split("max |naive - whole module|:")[1].split()[0])
    assert ours < 1e-4 < 1e-2 < naive, out
    assert (tmp_path / "u.png").stat().st_size > 10_000


NET_PY = """
from torch import nn


def net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )


def wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))


def gelu():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU())
"""


@pytest.mark.cluster
def test_a_pytorch_module_trains_from_the_command_line(tmp_path):
    """``--model torch:FILE:CALLABLE``: the module converted for the dataset's images, trained
    for an epoch; a module whose logits do not fit the classes, or that does not convert, is a
    setup error naming it."""
    optional.need_torch()
    (tmp_path / "nets.py").write_text(NET_PY)
    common = ("--dataset", "synthetic", "--batch-size", "256", "--epochs", "1", "--no-progress")
    with local_cluster(n_workers=1, processes=False) as cluster:
        rc, out, err = _run(
            "train",
            "--model",
            f"torch:{tmp_path / 'nets.py'}:net",
            *common,
            *("--scheduler", cluster.scheduler_address, "--out", str(tmp_path / "run")),
        )
        assert rc == 0, err
        assert out.splitlines()[0].startswith(f"net (PyTorch, {tmp_path / 'nets.py'}): ")
        log = json.loads((tmp_path / "run" / "log.json").read_text())
        assert [e["epoch"] for e in log] == [1]
        for name, message in (
            ("wide", "wide() gives outputs of shape (7,) for one image; synthetic has 10 classes"),
            ("gelu", "GELU"),
            ("nothing", "has no callable 'nothing'"),
        ):
            rc, out, err = _run(
                "train",
                "--model",
                f"torch:{tmp_path / 'nets.py'}:{name}",
                *common,
                *("--scheduler", cluster.scheduler_address, "--out", str(tmp_path / name)),
            )
            assert rc != 0 and message in err, err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--model", "torch:nets"])


@pytest.mark.parametrize(
    "files, spec, message",
    [
        (
            {"nets.py": "raise RuntimeError('weights not found')\n"},
            "torch:{tmp}/nets.py:net",
            "importing {tmp}/nets.py raised RuntimeError: weights not found",
        ),
        (
            {"nets.py": "def net(:\n    pass\n"},
            "torch:{tmp}/nets.py:net",
            "importing {tmp}/nets.py raised SyntaxError: ",
        ),
        (
            {"nets.py": "def net():\n    return 1 / 0\n"},
            "torch:{tmp}/nets.py:net",
            "net() raised ZeroDivisionError: division by zero",
        ),
        (
            {"mynets.py": "import not_a_module_anywhere\n"},
            "torch:mynets:net",
            "importing mynets raised ModuleNotFoundError: No module named 'not_a_module_anywhere'",
        ),
    ],
    ids=["raises on import", "syntax error", "factory raises", "module raises on import"],
)
def test_an_error_in_the_code_of_a_torch_model_is_one_line_and_exit_2(files, spec, message, tmp_path):
    """The file or module of ``--model torch:...`` is the user's code: whatever it raises, on import
    or in its factory, ends the command as bad input does (in a process of its own, as a user runs
    it: what reaches standard error is all there is)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    spec, message = spec.format(tmp=tmp_path), message.format(tmp=tmp_path)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    argv = ["train", "--dataset", "synthetic", "--model", spec, "--out", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "dask_pconv.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    name, where = spec.split(":")[2], spec.split(":")[1]
    assert proc.stderr.startswith(
        f"dask-pconv train: error: loading the PyTorch model {name} from {where}: {message}"
    )
    assert proc.stdout == ""


def test_the_docs_say_that_a_torch_model_file_is_run():
    path = ROOT / "docs" / "torch.rst"
    if not path.exists():
        pytest.skip("no docs/ folder: not a source checkout")
    text = " ".join(path.read_text().split())
    assert "it executes that file's code" in text and "Run only files you trust." in text


#: ``dask-pconv train`` (its arguments after ``--``), with a Ctrl-C sent to its process group as
#: the first worker process starts, and a scheduler that answers no worker heartbeat, so that one
#: is in flight when the cluster closes (training starts once every worker has sent one)
_CTRL_C_AT_START = """
import asyncio, os, signal, sys, threading
from distributed.process import AsyncProcess
import dask_pconv.cluster as cluster
from dask_pconv import cli
from dask_pconv.train import Trainer

start, sent = AsyncProcess.start, []

async def start_then_ctrl_c(self):
    await start(self)
    if not sent:
        sent.append(True)
        os.killpg(os.getpgid(0), signal.SIGINT)

AsyncProcess.start = start_then_ctrl_c
make, heartbeats = cluster._local_cluster, threading.Semaphore(0)

def unanswered_heartbeats(**kwargs):
    c = make(**kwargs)

    async def never(*args, **kw):
        heartbeats.release()
        await asyncio.sleep(3600)

    c.scheduler.handlers["heartbeat_worker"] = never
    return c

cluster._local_cluster = unanswered_heartbeats
run = Trainer.run

def run_after_a_heartbeat(self, epochs):
    heartbeats.acquire(timeout=60)
    return run(self, epochs)

Trainer.run = run_after_a_heartbeat
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.cluster
def test_a_ctrl_c_while_the_cluster_starts_and_its_shutdown_print_nothing(tmp_path):
    """A Ctrl-C while the cluster starts is ignored (the worker processes, still importing, printed
    a traceback each, 113 lines in all), and the cluster the command started closes without
    distributed's messages (a worker's heartbeat cut short by the closing cluster logged a
    30-line CommClosedError traceback).  In a process group of its own, which gets the signal as
    a terminal's Ctrl-C does."""
    argv = ["train", "--dataset", "synthetic", "--width", "0.0625", "--batch-size", "206", "--epochs", "1"]
    argv += ["--workers", "1", "--out", str(tmp_path / "run"), "--no-progress", "--dashboard", ""]
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_AT_START, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "tasks per step:" in proc.stdout
