"""The seeds' headline run: Chainer's CIFAR VGG16 trained model-parallel over 4 workers.

ChainerMN's example splits every convolution's channels over 4 processes (20 epochs, about 76%
validation accuracy).  Here the convolutions are split by *output* channels over 4 workers --
the same layout, but the full convolution (ChainerMN's parallel conv is really a grouped one).
The same network can be run split by batch or by spatial tiles with ``--split``.

    python examples/vgg16_model_parallel.py --data-dir ~/data/cifar-10-batches-py   # the seeds' run
    python examples/vgg16_model_parallel.py --epochs 2 --width 0.25                 # bundled digits
    python examples/vgg16_model_parallel.py --split batch:4
    python examples/vgg16_model_parallel.py --split spatial:2x2

Prints Chainer's LogReport table per epoch and writes log.json, plots and checkpoints to --out.
"""

import argparse

from dask_pconv.cluster import connect
from dask_pconv.data import format_split, load_dataset, parse_split
from dask_pconv.models import VGG16
from dask_pconv.optim import MomentumSGD
from dask_pconv.train import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="CIFAR-10 python batches; without it the bundled digits are used")
    ap.add_argument("--split", default="out_channel:4", help="as dask-pconv train's --split")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="result-vgg16")
    args = ap.parse_args(argv)

    dataset = "cifar10" if args.data_dir else "digits"
    train, val = load_dataset(dataset, data_dir=args.data_dir)
    model = VGG16(n_classes=train.n_classes, width=args.width)
    split = parse_split(args.split)
    with connect(n_workers=args.workers, threads_per_worker=1) as client:
        print(
            f"{dataset}, VGG16 width {args.width}, split {format_split(split)}, {args.workers} workers, "
            f"dashboard {client.dashboard_link}"
        )
        trainer = Trainer(
            model,
            train,
            val,
            batch_size=args.batch_size,
            split=split,
            optimizer=MomentumSGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
            out=args.out,
            dropout=dataset == "cifar10",
        )
        trainer.run(args.epochs)
        print(f"tasks per step: {trainer.tasks_per_step}")


if __name__ == "__main__":
    main()
