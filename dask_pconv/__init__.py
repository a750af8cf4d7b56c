"""dask_pconv: exact 2-D convolutions and CNNs as Dask task graphs.

A chunked Dask array of images (N, C, H, W) is convolved split along the batch axis, the
channel axes or the spatial axes (tiles with halos), in any mix, and the result equals the
unsplit convolution.
"""

from .models.pytorch import from_torch
from .ops import conv2d, conv2d_vjp, max_pool2d, max_pool2d_vjp, split
from .store import conv2d_to_zarr, features_to_zarr, open_image, to_zarr

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "conv2d_to_zarr",
    "conv2d_vjp",
    "features_to_zarr",
    "from_torch",
    "max_pool2d",
    "max_pool2d_vjp",
    "open_image",
    "split",
    "to_zarr",
    "__version__",
]
