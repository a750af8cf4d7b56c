"""The ``dask-pconv`` command line: what it refuses before starting anything, its help, the
messages of a resumed or interrupted run, and the files a fresh clone should not track."""

import argparse
import contextlib
import importlib.util
import io
import pathlib
import re
import shlex

import pytest
from clusters import local_cluster

from dask_pconv import cli, profiling

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
    ],
)
def test_the_command_line_of_a_run_gives_the_same_run(argv):
    parser = cli.build_parser()
    args = parser.parse_args(["train", *argv])
    words = shlex.split(cli._command_line(args))
    assert words[:2] == ["dask-pconv", "train"]
    assert vars(parser.parse_args(words[1:])) == vars(args)


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
