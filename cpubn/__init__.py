"""cpubn: fast, exact Batch Normalization for NumPy on multi-core CPUs.

    >>> import numpy as np, cpubn
    >>> bn = cpubn.BatchNorm(64)                      # like torch.nn.BatchNorm2d(64)
    >>> y = bn(np.random.randn(8, 64, 14, 14).astype(np.float32))
    >>> dx = bn.backward(np.ones_like(y))

See BatchNorm, batch_norm, batch_norm_forward, batch_norm_backward, and the thread
controls set_num_threads / get_num_threads / threads.
"""
from ._module import BatchNorm
from ._thread_control import get_num_threads, openmp_enabled, set_num_threads, threads
from .functional import batch_norm, batch_norm_backward, batch_norm_forward

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "openmp_enabled",
]
