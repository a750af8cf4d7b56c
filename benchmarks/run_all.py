"""Run the whole benchmark suite and write one JSON per benchmark into --out.

python benchmarks/run_all.py --out bench-results
"""

import argparse
import pathlib

import bench_chunked
import bench_filter
import bench_kernels
import bench_models
import bench_vgg_step
import bench_zarr
from _common import machine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(exist_ok=True)
    print(machine())
    for name, mod in [
        ("kernels", bench_kernels),
        ("chunked", bench_chunked),
        ("vgg_step", bench_vgg_step),
        ("models", bench_models),
        ("filter", bench_filter),
        ("zarr", bench_zarr),
    ]:
        print(f"\n== {name}")
        mod.main(["--json", str(out / f"{name}.json")])


if __name__ == "__main__":
    main()
