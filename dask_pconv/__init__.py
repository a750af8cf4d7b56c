"""dask_pconv: exact 2-D convolutions and CNNs as Dask task graphs.

A chunked Dask array of images (N, C, H, W) is convolved split along the batch axis, the
channel axes or the spatial axes (tiles with halos), in any mix, and the result equals the
unsplit convolution.
"""

from .ops import conv2d, conv2d_vjp, max_pool2d, max_pool2d_vjp, split

__version__ = "0.1.0"

__all__ = ["conv2d", "conv2d_vjp", "max_pool2d", "max_pool2d_vjp", "split", "__version__"]
