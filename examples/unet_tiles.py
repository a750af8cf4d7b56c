"""A PyTorch U-Net run exactly on tiles of a large real image, next to the same network run
naively tile by tile.

The image is scikit-image's bundled ``camera`` (512x512, no download), enlarged ``--scale``
times.  A small U-Net written in PyTorch is trained for a few steps to mark the image's bright
regions, converted with ``dask_pconv.from_torch`` and run on ``--tile``-sized tiles of the
enlarged image, each layer with the halos its neighbours hand it.  The result is compared with
the module run on the whole image, and so is the naive tiled run (each tile through the module
on its own, zero padding at every tile edge, the outputs stitched together).  The PNG shows the
image, the prediction and both errors: the naive run's seams along every tile edge, none in
ours.

    pip install -e '.[examples]' torch
    python examples/unet_tiles.py                      # writes unet_tiles.png
    python examples/unet_tiles.py --scale 8 --tile 512 --out big.png
"""

import argparse
import time

import dask
import dask.array as da
import numpy as np

import dask_pconv as dp


def unet(width=8):
    """A two-level U-Net as a PyTorch module (what a user would bring)."""
    import torch
    from torch import nn

    def block(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down0, self.down1 = block(1, width), block(width, 2 * width)
            self.bottom = block(2 * width, 4 * width)
            self.up1, self.dec1 = (
                nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2),
                block(4 * width, 2 * width),
            )
            self.up0, self.dec0 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), block(2 * width, width)
            self.pool, self.head = nn.MaxPool2d(2), nn.Conv2d(width, 2, 1)

        def forward(self, x):
            s0 = self.down0(x)
            s1 = self.down1(self.pool(s0))
            h = self.bottom(self.pool(s1))
            h = self.dec1(torch.cat([self.up1(h), s1], dim=1))
            h = self.dec0(torch.cat([self.up0(h), s0], dim=1))
            return self.head(h)

    return UNet()


def train_briefly(module, image, steps, seed=0):
    """A few Adam steps on random 64x64 crops, the target the crop's bright pixels."""
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        rows, cols = rng.integers(0, image.shape[0] - 64, 8), rng.integers(0, image.shape[1] - 64, 8)
        x = np.stack([image[r : r + 64, c : c + 64] for r, c in zip(rows, cols)])[:, None]
        loss = torch.nn.functional.cross_entropy(
            module(torch.tensor(x)), torch.tensor((x[:, 0] > 0.5).astype(np.int64))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval()


def naive_tiles(module, image, tile):
    """Each tile through the module on its own (zero padding at every tile edge), stitched."""
    import torch

    out = np.empty((2,) + image.shape, np.float32)
    with torch.no_grad():
        for r in range(0, image.shape[0], tile):
            for c in range(0, image.shape[1], tile):
                x = torch.tensor(image[None, None, r : r + tile, c : c + tile])
                out[:, r : r + tile, c : c + tile] = module(x)[0].numpy()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4, help="enlarge the 512x512 image this many times")
    ap.add_argument("--tile", type=int, default=256, help="tile size (a multiple of 4)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the PyTorch module")
    ap.add_argument("--out", default="unet_tiles.png", help="the figure")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import torch
    from skimage import data

    torch.manual_seed(0)
    image = np.kron(data.camera().astype(np.float32) / 255, np.ones((args.scale, args.scale), np.float32))
    module = train_briefly(unet(), image, args.steps)
    with torch.no_grad():
        t0 = time.perf_counter()
        whole = module(torch.tensor(image[None, None]))[0].numpy()
        t_whole = time.perf_counter() - t0
    model = dp.from_torch(module)
    x = da.from_array(image[None, None], chunks=(1, 1, args.tile, args.tile))
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ours = model.predict(x).compute()[0]
    t_ours = time.perf_counter() - t0
    naive = naive_tiles(module, image, args.tile)
    err_ours, err_naive = np.abs(ours - whole).max(axis=0), np.abs(naive - whole).max(axis=0)
    print(f"image {image.shape[0]}x{image.shape[1]}, tiles {args.tile}x{args.tile}")
    print(f"max |ours - whole module|:  {err_ours.max():.3g}   ({t_ours:.1f} s)")
    print(f"max |naive - whole module|: {err_naive.max():.3g}")
    print(f"the module on the whole image: {t_whole:.1f} s")
    # a zoom on four tiles' corner, where the naive run's seams cross
    c = args.tile * (image.shape[0] // args.tile // 2)
    zoom = (slice(c - args.tile, c + args.tile), slice(c - args.tile, c + args.tile))
    logit = lambda y: y[1] - y[0]  # noqa: E731
    vmax = float(np.abs(logit(whole)).max())
    norm = matplotlib.colors.LogNorm(vmin=1e-7, vmax=max(err_naive.max(), 1e-6))
    fig, axes = plt.subplots(1, 5, figsize=(26, 5.6))
    panels = [
        (image, "the image", dict(cmap="gray")),
        (logit(ours), "dask_pconv on tiles: U-Net logit", dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
        (
            logit(naive)[zoom],
            "naive tiles, zoom on a tile corner",
            dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax),
        ),
        (
            err_naive + 1e-12,
            f"naive tiles: |error| (max {err_naive.max():.2g})",
            dict(cmap="magma", norm=norm),
        ),
        (
            err_ours + 1e-12,
            f"dask_pconv tiles: |error| (max {err_ours.max():.2g})",
            dict(cmap="magma", norm=norm),
        ),
    ]
    for ax, (img, title, kw) in zip(axes, panels):
        im = ax.imshow(img, **kw)
        ax.set_title(title)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
