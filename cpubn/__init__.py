"""cpubn: fast, exact Batch Normalization for NumPy on multi-core CPUs.

    >>> import numpy as np, cpubn
    >>> bn = cpubn.BatchNorm(64)                      # like torch.nn.BatchNorm2d(64)
    >>> y = bn(np.random.randn(8, 64, 14, 14).astype(np.float32))
    >>> dx = bn.backward(np.ones_like(y))

Fused activation and residual add, in the same pass over memory:

    >>> bn = cpubn.BatchNorm(64, activation="relu")   # y = relu(bn(x))
    >>> x = np.random.randn(8, 64, 14, 14).astype(np.float32)
    >>> y = bn(x, residual=x)                         # y = relu(bn(x) + residual)
    >>> dx, dresidual = bn.backward(np.ones_like(y))

Half-precision data (float16, or ml_dtypes.bfloat16) is computed in float32 with float32
parameters and returned in its own dtype:

    >>> y16 = cpubn.BatchNorm(64)(x.astype(np.float16))   # y16.dtype == float16

Small or non-i.i.d. batches: BatchRenorm (with renorm_schedule), GhostBatchNorm, and
``with precise_statistics(layers):`` for exact population statistics.

Data-parallel training over MPI (``pip install "cpubn[mpi]"``): SyncBatchNorm normalizes
with the statistics of the batches of all processes.

Inference that keeps nothing for a backward: ``with cpubn.no_grad(): y = model(x)`` (an
eval-mode forward keeps only weak references by itself).

See BatchNorm (and LazyBatchNorm, SyncBatchNorm), batch_norm, batch_norm_forward,
batch_norm_backward (all take activation= and residual=), the inference folding helpers
fold_into_linear / fold_into_conv / fold_into_following_linear, and the thread controls
set_num_threads / get_num_threads / threads.  Large results live in recycled memory
(release_pooled_memory() gives the unused part back to the system).

Porting: BatchNorm.from_torch(module), load_state_dicts(layers, model.state_dict()) and
BatchNorm.from_onnx(model, node_name) (cpubn imports neither torch nor onnx itself).
"""
from ._layers import (BatchNorm, BatchRenorm, GhostBatchNorm, LazyBatchNorm, SyncBatchNorm,
                      no_grad, precise_statistics, renorm_schedule)
from ._core.threads import get_num_threads, openmp_enabled, set_num_threads, threads
from ._kernels.pool import release_pooled_memory
from .fold import fold_into_conv, fold_into_following_linear, fold_into_linear
from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .porting import load_state_dicts, to_onnx_node

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "LazyBatchNorm",
    "SyncBatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "precise_statistics",
    "renorm_schedule",
    "no_grad",
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "openmp_enabled",
    "release_pooled_memory",
    "fold_into_linear",
    "fold_into_conv",
    "fold_into_following_linear",
    "load_state_dicts",
    "to_onnx_node",
]
