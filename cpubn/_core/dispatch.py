"""Run the compiled kernels on validated arrays: pick the layout, the thread count and the
output buffer.  No validation of user input here (see validation) and no state (see
cpubn._layers); the per-call work in Python is choosing views and allocating outputs.
"""
from typing import Any

import numpy as np
from numpy.typing import NDArray

# threads first: it loads the OpenMP runtime with cpubn's wait policy, which
# must happen before the kernel modules (linked against the runtime) are imported.
from . import threads as _threads  # isort: skip
from .threads import team_finished, threads_for
from .._kernels import backward as _backward
from .._kernels import forward as _forward
from .._kernels import pool as _pool
from .machine import data_caches, last_level_cache_bytes
from .overflow import (all_finite, redo_backward_sums, redo_eval_channels,
                       redo_forward_statistics)
from .layout import Layout, plan
from .validation import is_half


# Results at least this large come from cpubn._kernels.pool (recycled, already-mapped
# memory): from about this size malloc hands out fresh pages, whose first-touch faults
# cost as much as a mid-sized call's whole work; below it, its free lists reuse memory.
POOL_MIN_BYTES = 64 << 10


def stream_min_bytes(last_level_cache: int) -> int:
    """The smallest output the channels-first training and backward kernels write with
    non-temporal stores, for a last-level cache of that many bytes (0: unknown).

    Streaming saves reading every output line before writing it, when the output would
    not stay in the caches anyway; but an output still in the last-level cache, dirty
    from its previous use (an `out=` buffer written again, a recycled pool block), is
    written back and evicted line by line first, and streaming then costs more than it
    saves.  So outputs stream from an eighth of the last level, where a dirty buffer no
    longer costs more than streaming saves, and never below 16 MiB, the threshold that
    hosts with a last level of 8-32 MiB need."""
    return max(16 << 20, last_level_cache // 8)


# Channels-first training and backward outputs at least this large are written with
# non-temporal stores (_output says which calls stream).
STREAM_MIN_BYTES = stream_min_bytes(last_level_cache_bytes(data_caches()))

# What a backward returns: (dx, grads, dresidual), see backward.
BackwardResult = tuple[NDArray[Any], NDArray[np.float64], NDArray[Any] | None]

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)


def param_dtype(x_dtype: np.dtype[Any], *arrays: object) -> np.dtype[Any]:
    """The dtype the kernels read per-channel arrays in: that of the first array given,
    float32 or else float64.  Half-precision data always takes float32 parameters
    (PyTorch's "mixed type"): the kernels compute it in float32."""
    if is_half(x_dtype):
        return _FLOAT32
    dtype = x_dtype
    for a in arrays:
        if a is not None:
            dtype = getattr(a, "dtype", _FLOAT64)    # lists: converted to float64
            break
    return _FLOAT32 if dtype == _FLOAT32 else _FLOAT64


def kernel_params(x_dtype: np.dtype[Any], *arrays: NDArray[Any] | None
                  ) -> list[NDArray[Any] | None]:
    """Per-channel arrays in the form the kernels read: contiguous, of one float dtype
    (param_dtype); None stays None (gamma = 1, beta = 0).  Arrays already in that form are
    returned as they are (the same objects).  Preconditions (checked by
    validation.check_channel_array): None or float ndarrays of shape (C,).  Converts,
    never raises."""
    dtype = param_dtype(x_dtype, *arrays)
    return [a if a is None or (a.dtype == dtype and a.flags.c_contiguous)
            else np.ascontiguousarray(a, dtype=dtype) for a in arrays]


def _output(dtype: np.dtype[Any], layout: Layout, out: NDArray[Any] | None,
            may_stream: bool = True) -> tuple[NDArray[Any], bool]:
    """(the dense buffer the kernel writes, whether to write it with streaming stores).
    With an `out` whose memory order differs from the input's, the buffer is a temporary,
    copied into out by _finish.

    A buffer of at least POOL_MIN_BYTES comes from cpubn._kernels.pool (recycled memory, an
    ordinary array whose base is its pool block).  When the kernel may_stream, a buffer
    of at least STREAM_MIN_BYTES is written with streaming stores when its memory is
    already mapped (out, or a reused block): they save reading every line before it is
    written.  Fresh memory is written with ordinary stores instead, which find the lines
    its page faults have just zeroed still in cache (streaming over them is slower).

    Eval (may_stream False) always writes with ordinary stores: its single pass measured
    faster with them than with streaming, on every host and output size tried.

    Channels-last rows (S == 1) are written with ordinary stores too: their second pass
    reads x (and dy) back from memory, and streaming measured slower there.  Channels-first
    training and backward stream: their channel blocks are normalized from cache, where
    ordinary stores measured slower."""
    may_stream = may_stream and layout.kernel_dims[2] > 1
    if out is not None:
        dense = layout.dense_or_none(out)
        if dense is not None:
            return dense, may_stream and dense.nbytes >= STREAM_MIN_BYTES
    if layout.size * dtype.itemsize >= POOL_MIN_BYTES:
        buffer, fresh = _pool.empty(layout.dense_shape, dtype)
        return buffer, may_stream and not fresh and buffer.nbytes >= STREAM_MIN_BYTES
    return layout.new_dense(dtype), False


def _finish(dense_out: NDArray[Any], layout: Layout, out: NDArray[Any] | None) -> NDArray[Any]:
    if out is None:
        return layout.to_user(dense_out)
    if dense_out is not out and dense_out.base is not out:    # a temporary (see _output)
        np.copyto(out, layout.to_user(dense_out))
    return out


class Saved:
    """What a backward needs from its forward: the input (dense, in its layout's memory
    order), the layout, and the float64 statistics used (stats = [mean, invstd(, biased
    batch variance)] back to back).  A fused forward adds its output y_dense (with ReLU:
    its sign is the mask, so it is a reference, not a copy) and whether it added a
    residual (then backward also returns the residual's gradient).

    weak: None, or (a weak reference to the input, one to the output or None) in place of
    x_dense and y_dense, for a caller that must not keep its arrays alive (an eval-mode
    layer): strong() gives the Saved back while the arrays still exist."""

    __slots__ = ("x_dense", "layout", "stats", "batch_stats", "y_dense", "residual", "weak")

    def __init__(self, x_dense: NDArray[Any], layout: Layout, stats: NDArray[np.float64],
                 batch_stats: bool, y_dense: NDArray[Any] | None = None,
                 residual: bool = False) -> None:
        self.x_dense = x_dense
        self.layout = layout
        self.stats = stats
        self.batch_stats = batch_stats
        self.y_dense = y_dense
        self.residual = residual
        self.weak: tuple[Any, Any] | None = None

    def strong(self) -> "Saved | None":
        """For a Saved holding weak references: a Saved holding the arrays themselves, or
        None if they no longer exist.  Any other Saved: itself."""
        if self.weak is None:
            return self
        x_ref, y_ref = self.weak
        x = x_ref()
        y = None if y_ref is None else y_ref()
        if x is None or (y_ref is not None and y is None):
            return None
        layout = self.layout
        return Saved(layout.dense(x), layout, self.stats, self.batch_stats,
                     None if y is None else layout.dense(y), self.residual)

    @property
    def channels(self) -> int:
        return self.layout.kernel_dims[1]

    @property
    def mean(self) -> NDArray[np.float64]:
        return self.stats[:self.channels]

    @property
    def invstd(self) -> NDArray[np.float64]:
        return self.stats[self.channels:2 * self.channels]

    @property
    def batch_var(self) -> NDArray[np.float64]:
        """Biased batch variance (batch-statistics forwards only)."""
        return self.stats[2 * self.channels:]


def forward(x: NDArray[Any], axis: int, weight: NDArray[Any] | None,
            bias: NDArray[Any] | None, eps: float,
            out: NDArray[Any] | None, running_mean: NDArray[Any] | None = None,
            running_var: NDArray[Any] | None = None, params_checked: bool = False,
            residual: NDArray[Any] | None = None, relu: bool = False,
            layout: Layout | None = None) -> tuple[NDArray[Any], Saved]:
    """Normalize x with batch statistics (running_mean is None) or the given ones;
    returns (y, Saved).  The per-channel arrays are validated (None or float arrays of
    shape (C,)); params_checked: they are already in kernel form (kernel_params; the
    BatchNorm object caches that).  residual (an array like x, in any memory order) is
    added to the normalized values and relu applies max(., 0), both in the kernel's single
    pass.  layout: x's Layout when the caller has it (a BatchNorm's plan), else looked up."""
    if layout is None:
        layout = plan(x, axis)
    x_dense = layout.dense(x)
    if residual is not None:
        residual = layout.dense(residual)     # into x's memory order (a copy only if needed)
    y_dense, stream = _output(x.dtype, layout, out, may_stream=running_mean is None)
    n, channels, s = layout.kernel_dims
    size = layout.size        # small calls (the per-layer inference path) skip threads_for
    eval_call = running_mean is not None
    n_threads = (1 if size < _threads.PARALLEL_MIN_ELEMENTS
                 else threads_for(size, light=eval_call))
    if running_mean is None:
        stats = np.empty(3 * channels)
        if not params_checked:
            weight, bias = kernel_params(x.dtype, weight, bias)
        _forward.forward_train(x_dense, y_dense, weight, bias, eps, stats, n, channels, s,
                               n_threads, stream, residual, relu)
        if not all_finite(stats[2 * channels:]):    # overflowed float32 sums, or NaN/Inf data
            redo_forward_statistics(x_dense, y_dense, layout, stats, weight, bias, eps,
                                    residual, relu)
    else:
        stats = np.empty(2 * channels)
        if not params_checked:
            running_mean, running_var, weight, bias = kernel_params(
                x.dtype, running_mean, running_var, weight, bias)
        if _forward.forward_eval(x_dense, y_dense, running_mean, running_var, weight, bias,
                                 eps, stats, n, channels, s, n_threads, stream, residual,
                                 relu):            # float constants beyond float's range
            redo_eval_channels(x_dense, y_dense, layout, stats, weight, bias, residual, relu)
    if n_threads > 1:
        team_finished(n_threads)
    return _finish(y_dense, layout, out), Saved(x_dense, layout, stats, running_mean is None,
                                                y_dense if relu else None,
                                                residual is not None)


def backward(dy: NDArray[Any], saved: Saved, weight: NDArray[Any] | None,
             out: NDArray[Any] | None) -> BackwardResult:
    """(dx, grads, dresidual) for the forward that produced `saved` (weight: validated, as
    in forward, and converted here); grads is a float64
    array holding grad_weight[C] then grad_bias[C]; dresidual is the gradient of a fused
    forward's residual (None without one).  A forward with ReLU differentiates through
    the mask read from saved.y_dense."""
    layout = saved.layout
    dy_dense = layout.dense(dy)
    dx_dense, stream = _output(dy.dtype, layout, out)
    n, channels, s = layout.kernel_dims
    grads = np.empty(2 * channels)
    (weight,) = kernel_params(dy.dtype, weight)
    dresidual = _output(dy.dtype, layout, None)[0] if saved.residual else None
    n_threads = threads_for(dy.size)
    _backward.backward(dy_dense, saved.x_dense, dx_dense, saved.stats, weight,
                       saved.batch_stats, grads, n, channels, s, n_threads,
                       stream, saved.y_dense, dresidual)
    if n_threads > 1:
        team_finished(n_threads)
    if not all_finite(grads):                   # overflowed float32 sums, or NaN/Inf data
        redo_backward_sums(dy_dense, saved.x_dense, dx_dense, saved.y_dense, layout,
                           saved.stats, weight, saved.batch_stats, grads)
    if dresidual is not None:
        dresidual = layout.to_user(dresidual)
    return _finish(dx_dense, layout, out), grads, dresidual


def update_running_stats(running_mean: NDArray[Any] | None, running_var: NDArray[Any] | None,
                         mean: NDArray[np.float64], var: NDArray[np.float64], factor: float,
                         counter: NDArray[np.int64] | None, count: int | None = None) -> None:
    """One training step of the running statistics: running = (1 - factor) * running +
    factor * batch, in place, computed in float64 and rounded once, with `mean` for
    running_mean and `var` for running_var; then `counter` (a layer's num_batches_tracked,
    an int64 array of one element, or None) grows by one.  `var` is unbiased, or, with
    `count` (the values per channel, at least 2), biased and made unbiased here
    (PyTorch's convention).  mean and var are contiguous float64.

    The kernel does the whole step in one call, so that an interrupt (a signal handler's
    KeyboardInterrupt) finds all of it done or none of it.  It runs when the running
    arrays are what the kernels read (contiguous, one dtype of float32 or float64); other
    float arrays (float16, strided views, assigned by hand) take the same arithmetic in
    NumPy, a step that an interrupt can split."""
    if count is None:
        var_scale = 1.0
    elif count >= 2:
        var_scale = count / (count - 1)
    else:
        raise ValueError(f"running statistics need at least 2 values per channel, got {count}")
    if _kernel_ready(running_mean, running_var):
        _forward.update_running_stats(running_mean, running_var, mean, var, len(mean),
                                      var_scale, factor, counter)
        return
    with np.errstate(over="ignore"):        # data beyond the stats' dtype gives inf
        if running_mean is not None:
            running_mean[...] = ((1.0 - factor) * running_mean.astype(np.float64)
                                 + factor * mean)
        if running_var is not None:
            running_var[...] = ((1.0 - factor) * running_var.astype(np.float64)
                                + factor * (var * var_scale))
    if counter is not None:
        counter += 1


def _kernel_ready(*arrays: NDArray[Any] | None) -> bool:
    """Whether the given arrays (None is skipped) are contiguous and share one dtype,
    float32 or float64."""
    dtype = None
    for a in arrays:
        if a is None:
            continue
        if dtype is None:
            dtype = a.dtype
        if a.dtype != dtype or not a.flags.c_contiguous:
            return False
    return dtype is None or dtype == _FLOAT32 or dtype == _FLOAT64


def batch_statistics(x: NDArray[Any], axis: int, eps: float) -> Saved:
    """A Saved (batch_stats=True, no output) holding the statistics a training forward of
    x would compute, bit for bit, without normalizing: for layers that normalize with
    other per-channel constants afterwards (forward with running_mean/running_var set to
    the constants they choose).  x is validated; it is only read."""
    layout = plan(x, axis)
    x_dense = layout.dense(x)
    n, channels, s = layout.kernel_dims
    stats = np.empty(3 * channels)
    n_threads = threads_for(x.size)
    _forward.batch_stats(x_dense, eps, stats, n, channels, s, n_threads)
    if n_threads > 1:
        team_finished(n_threads)
    return Saved(x_dense, layout, stats, True)
