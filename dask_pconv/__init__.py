"""dask_pconv: exact 2-D convolutions and CNNs as Dask task graphs.

A chunked Dask array of images (N, C, H, W) is convolved split along the batch axis, the
channel axes or the spatial axes (tiles with halos), in any mix, and the result equals the
unsplit convolution.
"""

from .models.pytorch import from_torch
from .ops import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_vjp,
    avg_pool2d,
    avg_pool2d_vjp,
    conv2d,
    conv2d_vjp,
    conv_transpose2d,
    conv_transpose2d_vjp,
    leaky_relu,
    leaky_relu_vjp,
    max_pool2d,
    max_pool2d_vjp,
    split,
    upsample_nearest,
    upsample_nearest_vjp,
)
from .store import conv2d_to_zarr, features_to_zarr, open_image, predict_to_zarr, to_zarr

__version__ = "0.1.0"

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_vjp",
    "avg_pool2d",
    "avg_pool2d_vjp",
    "conv2d",
    "conv2d_to_zarr",
    "conv2d_vjp",
    "conv_transpose2d",
    "conv_transpose2d_vjp",
    "features_to_zarr",
    "from_torch",
    "leaky_relu",
    "leaky_relu_vjp",
    "max_pool2d",
    "max_pool2d_vjp",
    "open_image",
    "predict_to_zarr",
    "split",
    "to_zarr",
    "upsample_nearest",
    "upsample_nearest_vjp",
    "__version__",
]
