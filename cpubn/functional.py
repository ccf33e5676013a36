"""The functional API, mirroring torch.nn.functional.batch_norm and ATen's
native_batch_norm / native_batch_norm_backward.  Validation, then dispatch."""
import numpy as np

from . import _dispatch
from ._layout import plan
from ._validation import (check_batch_stats_possible, check_channel_array, check_data,
                          check_eps, check_like, check_momentum, check_out)


def _check_running_buffer(buffer, channels, name, training):
    buffer = check_channel_array(buffer, channels, name)
    if training and buffer is not None:
        if not isinstance(buffer, np.ndarray) or not buffer.flags.writeable:
            raise ValueError(f"{name} must be a writeable numpy array: it is updated in "
                             f"place in training mode")
    return buffer


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, out=None):
    """Batch normalization forward pass; returns (y, save_mean, save_invstd).

    training=True normalizes with the batch's mean and biased variance and, if given,
    updates running_mean / running_var in place:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance).
    training=False normalizes with running_mean / running_var (both required).
    save_mean and save_invstd = 1 / sqrt(var + eps) are the float64 per-channel statistics
    that were used: pass them to batch_norm_backward.

    x: float32 or float64 array, ndim >= 2, features on `axis` (1 = channels-first,
    -1 = channels-last).  weight / bias: per-channel gamma / beta, or None (1 / 0).
    out: optional array of x's shape and dtype to write y into; it may be x itself
    (in-place) but must not partially overlap it.  y has x's dtype, shape and memory order.
    """
    x, axis = check_data(x, axis)
    channels = x.shape[axis]
    eps = check_eps(eps)
    momentum = check_momentum(momentum, allow_none=False)
    weight = check_channel_array(weight, channels, "weight")
    bias = check_channel_array(bias, channels, "bias")
    running_mean = _check_running_buffer(running_mean, channels, "running_mean", training)
    running_var = _check_running_buffer(running_var, channels, "running_var", training)
    out = check_out(out, x, may_alias=((x, "the input"),))
    if training:
        check_batch_stats_possible(x, axis)
        y, saved = _dispatch.forward(x, axis, weight, bias, eps, out)
        _dispatch.update_running_stats(running_mean, running_var, saved, x.size // channels,
                                       momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        y, saved = _dispatch.forward(x, axis, weight, bias, eps, out, running_mean,
                                     running_var)
    return y, saved.mean, saved.invstd


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, out=None):
    """Like torch.nn.functional.batch_norm: returns y; in training mode the running
    statistics (if not None) are updated in place.  See batch_norm_forward."""
    return batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis, out)[0]


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, training=True, axis=1,
                        out=None):
    """Gradients of batch normalization; returns (dx, dweight, dbias).

    save_mean / save_invstd are what batch_norm_forward returned.  training=True
    differentiates through the batch statistics; training=False treats them as constants
    (eval mode): dx = dy * weight * save_invstd.  dweight = sum(dy * (x - mean) * invstd)
    and dbias = sum(dy) over all axes but `axis`, in weight's dtype (x's if weight is None).
    out: optional array for dx; it may be dy itself but must not overlap x.
    """
    x, axis = check_data(x, axis, name="x")
    dy = check_like(dy, x.shape, x.dtype, "dy", "x")
    channels = x.shape[axis]
    save_mean = check_channel_array(save_mean, channels, "save_mean")
    save_invstd = check_channel_array(save_invstd, channels, "save_invstd")
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weight = check_channel_array(weight, channels, "weight")
    out = check_out(out, dy, may_alias=((dy, "dy"),), must_not_overlap=((x, "x"),))
    layout = plan(x, axis)
    stats = np.concatenate([save_mean, save_invstd]).astype(np.float64, copy=False)
    saved = _dispatch.Saved(layout.dense(x), layout, stats, bool(training))
    dx, grads = _dispatch.backward(dy, saved, weight, out)
    grad_dtype = weight.dtype if weight is not None else x.dtype
    return dx, grads[:channels].astype(grad_dtype), grads[channels:].astype(grad_dtype)
