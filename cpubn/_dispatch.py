"""Run the compiled kernels on validated arrays: pick the layout's kernel, the thread
count and the output buffer.  No validation here (see _validation) and no state (see
_module); the only per-call work in Python is choosing views and allocating outputs.
"""
import numpy as np

from . import _backward, _forward
from ._layout import plan
from ._thread_control import threads_for

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}


def _param_arrays(x_dtype, *arrays):
    """Per-channel arrays as contiguous arrays of one float dtype (the kernels' param_t);
    None becomes an empty array, which the kernels read as gamma = 1 / beta = 0."""
    present = [a for a in arrays if a is not None]
    dtype = present[0].dtype if present else x_dtype
    if dtype not in _EMPTY:
        dtype = np.dtype(np.float64)
    return [_EMPTY[dtype] if a is None else np.ascontiguousarray(a, dtype=dtype)
            for a in arrays]


def _output(x, layout, out):
    """(kernel-shaped buffer to write, array to return).  With an `out` whose memory
    order differs from x's, the kernel writes a temporary that is then copied into out."""
    if out is not None:
        view = layout.kernel_view_or_none(out)
        if view is not None:
            return view, out
    return layout.new_kernel_array(x.dtype), out


def _finish(kernel_out, layout, out):
    if out is None:
        return layout.to_user(kernel_out)
    if layout.kernel_view_or_none(out) is None:
        np.copyto(out, layout.to_user(kernel_out))
    return out


class Saved:
    """What a backward needs from its forward: the input's kernel view and layout, and the
    float64 statistics that were used."""

    __slots__ = ("x_kernel", "layout", "mean", "invstd", "batch_stats")

    def __init__(self, x_kernel, layout, mean, invstd, batch_stats):
        self.x_kernel = x_kernel
        self.layout = layout
        self.mean = mean
        self.invstd = invstd
        self.batch_stats = batch_stats


def forward(x, axis, weight, bias, eps, out, running_mean=None, running_var=None):
    """Normalize x with batch statistics (running_mean is None) or the given ones.

    Returns (y, saved, batch_var) with batch_var the biased float64 batch variance, or
    None when the given statistics were used."""
    layout = plan(x, axis)
    x_kernel = layout.kernel_view(x)
    y_kernel, out = _output(x, layout, out)
    channels = layout.kernel_shape[1]
    mean = np.empty(channels)
    invstd = np.empty(channels)
    n_threads = threads_for(x.size)
    if running_mean is None:
        batch_var = np.empty(channels)
        weight, bias = _param_arrays(x.dtype, weight, bias)
        kernel = _forward.forward_train_nhwc if layout.channels_last else _forward.forward_train_nchw
        kernel(x_kernel, y_kernel, weight, bias, eps, mean, invstd, batch_var, n_threads)
    else:
        batch_var = None
        running_mean, running_var, weight, bias = _param_arrays(
            x.dtype, running_mean, running_var, weight, bias)
        kernel = _forward.forward_eval_nhwc if layout.channels_last else _forward.forward_eval_nchw
        kernel(x_kernel, y_kernel, running_mean, running_var, weight, bias, eps, mean, invstd,
               n_threads)
    saved = Saved(x_kernel, layout, mean, invstd, batch_var is not None)
    return _finish(y_kernel, layout, out), saved, batch_var


def backward(dy, saved, weight, out):
    """(dx, grad_weight, grad_bias) for the forward that produced `saved`; the gradients
    are float64 arrays of length C."""
    layout = saved.layout
    dy_kernel = layout.kernel_view(dy)
    dx_kernel, out = _output(dy, layout, out)
    channels = layout.kernel_shape[1]
    grad_weight = np.empty(channels)
    grad_bias = np.empty(channels)
    (weight,) = _param_arrays(dy.dtype, weight)
    kernel = _backward.backward_nhwc if layout.channels_last else _backward.backward_nchw
    kernel(dy_kernel, saved.x_kernel, dx_kernel, saved.mean, saved.invstd, weight,
           saved.batch_stats, grad_weight, grad_bias, threads_for(dy.size))
    return _finish(dx_kernel, layout, out), grad_weight, grad_bias


def update_running_stats(running_mean, running_var, batch_mean, batch_var, count, factor):
    """running = (1 - factor) * running + factor * batch, in place, with the unbiased batch
    variance for running_var (PyTorch's convention).  Computed in float64, rounded once."""
    unbiased_var = batch_var * (count / (count - 1))
    if running_mean is not None:
        running_mean[...] = ((1.0 - factor) * running_mean.astype(np.float64)
                             + factor * batch_mean)
    if running_var is not None:
        running_var[...] = (1.0 - factor) * running_var.astype(np.float64) + factor * unbiased_var
