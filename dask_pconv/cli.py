"""The ``dask-pconv`` command.

``dask-pconv`` with no arguments is ``dask-pconv train``: VGG16 at width 0.25 on the bundled
digits, split by batch over a 2-worker LocalCluster on 127.0.0.1.  ``--model resnet18`` trains
the CIFAR ResNet-18 instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import pathlib
import shlex
import sys
import time
import warnings

from .data import DATASETS, check_split, format_split, load_dataset, parse_split

__all__ = ["SetupError", "main", "train_command"]


#: ``--model`` -> (the class in :mod:`dask_pconv.models`, the network's name in the run's first line)
MODELS = {"vgg16": ("VGG16", "VGG16"), "resnet18": ("ResNet18", "ResNet-18")}

#: per-dataset defaults for --lr and --dropout: Chainer's CIFAR recipe for cifar10; for the small
#: sets at width 0.25 its dropout keeps VGG16 near chance for 10 epochs and lr 0.05 leaves the
#: validation accuracy swinging by +-5 points between epochs (both measured, also in PyTorch)
RECIPES = {
    "cifar10": {"lr": 0.05, "dropout": True},
    "digits": {"lr": 0.02, "dropout": False},
    "synthetic": {"lr": 0.02, "dropout": False},
}


def _model_spec(text):
    """``--model``: a shipped network's name or ``torch:MODULE:CALLABLE``."""
    if text in MODELS:
        return text
    parts = text.split(":")
    if parts[0] == "torch" and len(parts) == 3 and all(parts[1:]):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}: choose {', '.join(MODELS)} or torch:MODULE:CALLABLE"
    )


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _split_spec(text):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            split = parse_split(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    for w in caught:  # the old spelling channel:N: one line, not a Python warning with a source line
        print(f"dask-pconv train: warning: --split: {w.message}", file=sys.stderr)
    return split


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default once: appended unless its help already says it (argparse's
    ArgumentDefaultsHelpFormatter adds a second one, and "(default: None)" where the default is
    worked out later: https://bugs.python.org/issue28742)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def build_parser():
    """The ``dask-pconv`` argument parser (sub-command ``train``)."""
    ap = argparse.ArgumentParser(prog="dask-pconv", description="Exact chunked CNNs on Dask.")
    sub = ap.add_subparsers(dest="command")
    tr = sub.add_parser(
        "train",
        help="train VGG16 or ResNet-18 (the default command)",
        description="Train VGG16 or ResNet-18 with one Dask graph per step on a new or an existing cluster.",
        formatter_class=_HelpFormatter,
    )
    _train_options(tr)
    return ap


def _train_options(tr):
    """Every ``train`` option, in the order ``--help`` lists them."""
    _network_and_data_options(tr)
    _optimization_options(tr)
    _cluster_options(tr)
    _run_options(tr)


def _network_and_data_options(tr):
    """The network and the images it trains on."""
    tr.add_argument(
        "--model",
        type=_model_spec,
        default="vgg16",
        help="the network: vgg16 (Chainer's CIFAR VGG16-BN), resnet18 (the CIFAR ResNet-18), or "
        "torch:MODULE:CALLABLE, a PyTorch module made by CALLABLE() from MODULE (an importable "
        "name or a .py file) and converted with dask_pconv.from_torch (needs PyTorch); this "
        "imports MODULE and calls CALLABLE, so it runs their code: name only files you trust",
    )
    tr.add_argument(
        "--width", type=_positive_float, default=0.25, help="channel width multiplier of either network"
    )
    tr.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (scikit-learn's, offline), cifar10 (needs --data-dir) or synthetic",
    )
    tr.add_argument(
        "--data-dir",
        default=None,
        help="folder with CIFAR-10's python batches (default: none; cifar10 needs it)",
    )


def _optimization_options(tr):
    """How long, in what steps and how each step is split."""
    tr.add_argument("--epochs", type=_positive_int, default=5, help="train until this many epochs are done")
    tr.add_argument("--batch-size", type=_positive_int, default=64, help="images per training step")
    tr.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 0.05 for cifar10 as Chainer's example, 0.02 for digits/synthetic)",
    )
    tr.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    tr.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay on every parameter")
    tr.add_argument(
        "--split",
        type=_split_spec,
        default="batch:2",
        help="how each step is split: batch:N (images), out_channel:N (the weights' output "
        "channels), spatial:HxW (image tiles; spatial:N means NxN), or a comma-separated mix "
        "such as batch:2,spatial:2x2; at most one piece per image and one tile per pixel row "
        "and column; channel:N is the old spelling of out_channel:N",
    )


def _cluster_options(tr):
    """The cluster the run starts or connects to, and what it records there."""
    tr.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="workers of a new cluster (default: 2; with --cuda, one per GPU)",
    )
    tr.add_argument("--threads-per-worker", type=_positive_int, default=1, help="threads of each new worker")
    tr.add_argument(
        "--scheduler",
        default=None,
        help="address of an existing scheduler, tcp://host:port (default: none, start a LocalCluster)",
    )
    tr.add_argument(
        "--dashboard", default="127.0.0.1:0", help="dashboard address of a new cluster ('' for none)"
    )
    tr.add_argument(
        "--report",
        default=None,
        help="write a performance report to this HTML file, and a per-operator summary beside it "
        "(default: none)",
    )
    tr.add_argument(
        "--cuda",
        action="store_true",
        help="train on CuPy blocks on the GPUs; without --scheduler, start dask-cuda's "
        "LocalCUDACluster (one worker per GPU)",
    )
    tr.add_argument(
        "--replicate",
        action="store_true",
        help="keep the parameters on every worker, so a worker lost mid-step loses nothing",
    )
    tr.add_argument(
        "--tls", action="store_true", help="run the new cluster over TLS with temporary credentials"
    )


def _run_options(tr):
    """Where the run writes, what it continues, and its seed, dropout, dtype and progress bar."""
    tr.add_argument("--out", default="result", help="folder for log.json, plots and checkpoints")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out (give the same options as the first run)",
    )
    tr.add_argument("--seed", type=int, default=0, help="seed of the weights, the shuffling and dropout")
    tr.add_argument(
        "--dropout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VGG16's dropout layers, Chainer's (default: on for cifar10, off for the small digits "
        "and synthetic sets, where at width 0.25 they keep VGG16 near chance for 10 epochs); "
        "ResNet-18 has none",
    )
    tr.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command_line(args):
    """The ``dask-pconv train`` command that gives ``args``: every option that differs from its
    default (an interrupted run is continued by this plus ``--resume``)."""
    options = argparse.ArgumentParser(add_help=False)
    _train_options(options)
    words = ["dask-pconv", "train"]
    for action in options._actions:
        value = getattr(args, action.dest)
        default = action.default
        if isinstance(default, str) and action.type is not None:
            default = action.type(default)
        if value == default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(f"--{'' if value else 'no-'}{action.dest.replace('_', '-')}")
        elif action.nargs == 0:
            words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], format_split(value) if action.dest == "split" else str(value)]
    return shlex.join(words)


class SetupError(Exception):
    """Bad input found while setting up a run (dataset, cluster, checkpoint): reported as a
    one-line error with exit status 2, like a bad argument, instead of a traceback."""


@contextlib.contextmanager
def _setup(what):
    try:
        yield
    except (ValueError, TypeError, KeyError, OSError, ImportError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SetupError(f"{what}: {msg}") from e


def train_command(args, stream=None):
    """Run ``dask-pconv train`` with parsed ``args``.

    Raises :class:`SetupError` for bad input found before training starts (the split is checked
    against the data before any cluster starts).  On ``KeyboardInterrupt`` (Ctrl-C, SIGINT) it
    names the last complete checkpoint and prints the command that continues the same run (these
    options plus ``--resume``), then re-raises; checkpoints are written atomically, so the last
    complete one is intact.  A ``--resume`` that finds no checkpoint says so and starts from
    epoch 1; one whose checkpoint already holds ``--epochs`` epochs says that training is
    complete and trains nothing.
    """
    from .optim import MomentumSGD

    stream = stream or sys.stdout
    to_device = _device_copy(args)
    train_set, val_set = _datasets(args)
    model = _model(args, train_set)
    optimizer = MomentumSGD(_recipe_value(args, "lr"), args.momentum, args.weight_decay)
    with _connect(args) as client:
        trainer = _trainer(args, model, train_set, val_set, optimizer, to_device, stream)
        if args.resume:
            _resume(trainer, args.out, stream)
        if trainer.epoch >= args.epochs:
            print(
                f"training is already complete: {args.out} holds epoch {trainer.epoch} and --epochs is "
                f"{args.epochs}; nothing to do (raise --epochs to train on)",
                file=stream,
            )
            return trainer.log
        print(_summary(args, model, train_set, val_set, client), file=stream)
        t0 = time.perf_counter()
        log = _train_epochs(args, trainer, stream)
        if trainer.tasks_per_step is not None:  # None when no step ran
            print(
                f"tasks per step: {trainer.tasks_per_step}; step graph: {trainer.step_graph}; "
                f"{time.perf_counter() - t0:.1f} s; log, plots and checkpoints in {args.out}/",
                file=stream,
            )
    return log


def _device_copy(args):
    """What copies each batch's blocks to the GPU (``cupy.asarray``) with ``--cuda``, else None."""
    if not args.cuda:
        return None
    try:
        import cupy
    except ImportError as e:
        raise SetupError(
            "--cuda needs CuPy and dask-cuda: pip install 'dask-pconv[gpu]' (or: pip install "
            "dask-cuda 'cupy-cuda12x[ctk]')"
        ) from e
    return cupy.asarray  # each batch's blocks; the weights follow them once


def _datasets(args):
    """``(train_set, val_set)`` of ``--dataset``, with ``--batch-size`` and ``--split`` checked
    against them."""
    with _setup(f"loading dataset {args.dataset!r}"):
        train_set, val_set = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    if args.batch_size > len(train_set):
        raise SetupError(f"--batch-size {args.batch_size} is more than the {len(train_set)} training images")
    try:  # before the cluster starts (issue 10: a traceback after it had)
        check_split(args.split, (args.batch_size, *train_set.x.shape[1:]))
    except ValueError as e:
        raise SetupError(f"--split: {e}") from e
    return train_set, val_set


def _recipe_value(args, name):
    """``--lr`` or ``--dropout`` as given, or the dataset's :data:`RECIPES` value."""
    value = getattr(args, name)
    return RECIPES[args.dataset][name] if value is None else value


def _model(args, train_set):
    """The ``--model`` network for ``train_set``'s images and classes."""
    from . import models

    if args.model not in MODELS:
        return _torch_model(args, train_set)
    network = getattr(models, MODELS[args.model][0])
    return network(
        n_classes=train_set.n_classes,
        in_channels=train_set.x.shape[1],
        width=args.width,
        seed=args.seed,
        dtype=args.dtype,
    )


def _torch_model(args, train_set):
    """``torch:MODULE:CALLABLE``: ``CALLABLE()`` from ``MODULE``, converted for the dataset's
    images; its output must be one logit per class."""
    import dask.array as da

    from .models import from_torch

    _, where, name = args.model.split(":")
    with _setup(f"loading the PyTorch model {name} from {where}"):
        factory = _torch_factory(where, name)
        try:
            module = factory()
        except Exception as e:  # the user's code: its error, on one line (issue 18)
            raise ValueError(f"{name}() raised {_one_line(e)}") from e
        model = from_torch(module, input_shape=train_set.x.shape[1:], dtype=args.dtype, seed=args.seed)
        out = model.predict(da.zeros((1, *train_set.x.shape[1:]), dtype=model.dtype)).shape
        if out != (1, train_set.n_classes):
            raise ValueError(
                f"{name}() gives outputs of shape {out[1:]} for one image; {args.dataset} has "
                f"{train_set.n_classes} classes, so it must give ({train_set.n_classes},)"
            )
    return model


def _torch_factory(where, name):
    """``name`` from ``where``, an importable module or a ``.py`` file, imported (so run: only
    files the user trusts).  ``ValueError`` naming the file for any error its code raises while
    it is imported, a syntax error included."""
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(pathlib.Path(where).stem, where)
        if spec is None or not pathlib.Path(where).is_file():
            raise FileNotFoundError(f"no Python file {where!r}")
    try:
        if where.endswith(".py"):
            source = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(source)
        else:
            source = importlib.import_module(where)
    except Exception as e:
        raise ValueError(f"importing {where} raised {_one_line(e)}") from e
    factory = getattr(source, name, None)
    if not callable(factory):
        raise ValueError(f"{where} has no callable {name!r}")
    return factory


def _one_line(error):
    """``Type: message`` of ``error`` on one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _model_name(args):
    if args.model in MODELS:
        return f"{MODELS[args.model][1]} width {args.width}"
    return f"{args.model.split(':')[2]} (PyTorch, {args.model.split(':')[1]})"


@contextlib.contextmanager
def _connect(args):
    """Within it, a client of the ``--scheduler`` or of a new cluster (``--workers``, ``--cuda``,
    ...).  A new cluster closes without distributed's shutdown noise (a heartbeat's 30-line
    traceback, a nanny's warnings: issue 18), after a failed or interrupted run too; a cluster
    started elsewhere is left as it is, and what it logs is its own."""
    from .cluster import _close_quietly, connect

    with _setup("connecting to the scheduler" if args.scheduler else "starting the cluster"):
        client = connect(
            args.scheduler,
            n_workers=args.workers if args.workers is not None or args.cuda else 2,
            threads_per_worker=args.threads_per_worker,
            dashboard_address=_dashboard(args),
            security=True if args.tls else None,
            cuda=args.cuda,
        )
    if args.scheduler:
        with client:
            yield client
        return
    try:
        yield client
    finally:
        _close_quietly(client)


def _dashboard(args):
    """``--dashboard``, None for '' (or only spaces): no dashboard."""
    return args.dashboard.strip() or None


def _trainer(args, model, train_set, val_set, optimizer, to_device, stream):
    """The :class:`~dask_pconv.train.Trainer` of these options (``--dropout`` from the recipe
    when not given)."""
    from .train import Trainer

    return Trainer(
        model,
        train_set,
        val_set,
        batch_size=args.batch_size,
        split=args.split,
        optimizer=optimizer,
        seed=args.seed,
        out=args.out,
        dropout=_recipe_value(args, "dropout"),
        progress=not args.no_progress,
        stream=stream,
        replicate=args.replicate,
        to_device=to_device,
    )


def _resume(trainer, out, stream):
    """Load the newest checkpoint in ``out``, and say where training continues."""
    with _setup(f"resuming from {out}"):
        resumed = trainer.resume()
    if resumed:
        print(f"resumed from epoch {trainer.epoch} (step {trainer.step})", file=stream)
    else:
        print(f"nothing to resume: no checkpoint in {out}; starting from epoch 1", file=stream)


def _summary(args, model, train_set, val_set, client):
    """The line that opens a run: network, data, split, recipe, workers and dashboard."""
    dashboard = client.dashboard_link if args.scheduler or _dashboard(args) else "off"
    return (
        f"{_model_name(args)}: {model.n_params:,} parameters; {args.dataset}: "
        f"{len(train_set)} train / {len(val_set)} validation; split {format_split(args.split)}; "
        f"lr {_recipe_value(args, 'lr')}, dropout {'on' if _recipe_value(args, 'dropout') else 'off'}; "
        f"{len(client.scheduler_info()['workers'])} workers; dashboard {dashboard}"
    )


def _train_epochs(args, trainer, stream):
    """``trainer.run(--epochs)``, recorded in a performance report with ``--report``; after
    Ctrl-C, says on standard error how to continue (:func:`_interrupted`) and re-raises it as
    :class:`_Reported`."""
    try:
        if not args.report:
            return trainer.run(args.epochs)
        from .profiling import profile, report_paths

        with profile(args.report):
            log = trainer.run(args.epochs)
        written = ", ".join(str(p) for p in report_paths(args.report))
        print(f"performance report and per-operator summary: {written}", file=stream)
        return log
    except KeyboardInterrupt as e:
        print(f"\n{_interrupted(args, trainer)}", file=sys.stderr)
        raise _Reported from e


class _Reported(KeyboardInterrupt):
    """A Ctrl-C whose line (where the run stopped, how to continue) is already on standard error."""


def _interrupted(args, trainer):
    """Where an interrupted run stopped, and the command that continues it."""
    last = trainer.latest_checkpoint()
    again = _command_line(args)
    where = (
        f"the last complete checkpoint is {last}; continue with: "
        f"{again if args.resume else again + ' --resume'}"
        if last
        else f"no epoch was complete, so there is no checkpoint yet; start again with: {again}"
    )
    return f"interrupted in epoch {trainer.epoch + 1} (after step {trainer.step}); {where}"


def main(argv=None):
    """The ``dask-pconv`` command; returns its exit status.

    0 on success, 2 for bad arguments or bad input found while setting up, an error raised by
    the code of a ``--model torch:FILE:CALLABLE`` included (one line on standard error, no
    traceback), 1 when the training loss becomes NaN/Inf or workers are lost more often than
    training restarts, 130 after Ctrl-C (one line: where training stopped and how to continue,
    or that it had not begun).  With no sub-command (or only options) it runs ``train``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import WorkerLossError

        try:
            train_command(args)
        except SetupError as e:
            print(f"dask-pconv train: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            return 2
        except (FloatingPointError, WorkerLossError) as e:  # diverged, or workers kept dying
            print(f"dask-pconv train: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            if not isinstance(e, _Reported):  # before training began: setting up, starting the cluster
                print("dask-pconv train: interrupted before training began", file=sys.stderr)
            return 130  # 128 + SIGINT, as shells report it
    return 0


if __name__ == "__main__":
    sys.exit(main())
