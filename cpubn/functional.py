"""The functional API, mirroring torch.nn.functional.batch_norm and ATen's
native_batch_norm / native_batch_norm_backward.  Validation, then dispatch."""
import numpy as np

from . import _dispatch
from ._layout import plan
from ._validation import (check_activation, check_batch_stats_possible, check_bool,
                          check_channel_array, check_data, check_eps, check_like,
                          check_momentum, check_out, check_residual, check_state_array)


def _check_running_buffer(buffer, channels, name, training):
    if training and buffer is not None:
        # Updated in place: a list or a read-only array would silently not be.
        return check_state_array(buffer, channels, name)
    return check_channel_array(buffer, channels, name)


def _named(**arrays):
    """(array, name) pairs of the given per-channel arrays, for check_out."""
    return tuple((a, name) for name, a in arrays.items())


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, out=None,
                       activation=None, residual=None):
    """Batch normalization forward pass; returns (y, save_mean, save_invstd).

    training=True normalizes with the batch's mean and biased variance and, if given,
    updates running_mean / running_var in place:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance).
    training=False normalizes with running_mean / running_var (both required).
    save_mean and save_invstd = 1 / sqrt(var + eps) are the float64 per-channel statistics
    that were used: pass them to batch_norm_backward.

    x: float32, float64, float16 or bfloat16 (ml_dtypes) array, ndim >= 2, features on
    `axis` (1 = channels-first, -1 = channels-last).  Half-precision x is computed in
    float32 with float32 parameters (other float arrays are converted) and y is rounded
    once to x's dtype.  weight / bias: per-channel gamma / beta, or None (1 / 0).
    out: optional array of x's shape and dtype to write y into; it may be x itself
    (in-place) but must not partially overlap it.  y has x's dtype, shape and memory order.

    Fused epilogue, computed in the same pass: ``residual`` (an array of x's shape and
    dtype, any memory order, never modified; out must not overlap it) is added to the
    normalized values, and ``activation="relu"`` applies max(., 0):
    y = relu(bn(x) + residual).  Keep y for batch_norm_backward: its sign is the ReLU
    mask.
    """
    x, axis = check_data(x, axis)
    training = check_bool(training, "training")
    relu = check_activation(activation) is not None
    if residual is not None:
        residual = check_residual(residual, x)
    channels = x.shape[axis]
    eps = check_eps(eps)
    momentum = check_momentum(momentum, allow_none=False)
    weight = check_channel_array(weight, channels, "weight")
    bias = check_channel_array(bias, channels, "bias")
    running_mean = _check_running_buffer(running_mean, channels, "running_mean", training)
    running_var = _check_running_buffer(running_var, channels, "running_var", training)
    out = check_out(out, x, may_alias=((x, "the input"),),
                    must_not_overlap=_named(weight=weight, bias=bias,
                                            running_mean=running_mean,
                                            running_var=running_var)
                    + (() if residual is None else ((residual, "the residual"),)))
    if training:
        check_batch_stats_possible(x, axis)
        y, saved = _dispatch.forward(x, axis, weight, bias, eps, out, residual=residual,
                                     relu=relu)
        _dispatch.update_running_stats(running_mean, running_var, saved, x.size // channels,
                                       momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        y, saved = _dispatch.forward(x, axis, weight, bias, eps, out, running_mean,
                                     running_var, residual=residual, relu=relu)
    return y, saved.mean, saved.invstd


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, out=None, activation=None, residual=None):
    """Like torch.nn.functional.batch_norm: returns y; in training mode the running
    statistics (if not None) are updated in place.  ``activation="relu"`` and
    ``residual`` fuse relu(bn(x) + residual) into the same pass.  See batch_norm_forward."""
    return batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis, out, activation, residual)[0]


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, training=True, axis=1,
                        out=None, activation=None, y=None, residual=False):
    """Gradients of batch normalization; returns (dx, dweight, dbias), or
    (dx, dweight, dbias, dresidual) with ``residual=True``.

    save_mean / save_invstd are what batch_norm_forward returned.  training=True
    differentiates through the batch statistics; training=False treats them as constants
    (eval mode): dx = dy * weight * save_invstd.  dweight = sum(dy * (x - mean) * invstd)
    and dbias = sum(dy) over all axes but `axis`, in weight's dtype (if weight is None:
    x's, float32 for half-precision x).
    out: optional array for dx; it may be dy itself but must not overlap x (or y).

    For a fused forward (batch_norm_forward with activation / residual), pass the same
    ``activation`` and, with ``activation="relu"``, its output ``y`` (required: the ReLU
    mask is y > 0, so y must not have been modified since); ``residual=True`` (the forward
    had a residual) also returns the residual's gradient, the gradient that reached
    bn(x) + residual.  dy is then the gradient of the fused output.
    """
    x, axis = check_data(x, axis, name="x")
    training = check_bool(training, "training")
    dy = check_like(dy, x.shape, x.dtype, "dy", "x")
    relu = check_activation(activation) is not None
    if relu:
        if y is None:
            raise ValueError("batch_norm_backward with activation='relu' needs y, the "
                             "forward's output (its sign is the ReLU mask)")
        y = check_like(y, x.shape, x.dtype, "y", "x")
    elif y is not None:
        raise ValueError("y (the forward's output) is only used with activation='relu'; "
                         "pass the activation the forward used")
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual must be True or False (whether the forward added a "
                        f"residual), got {type(residual).__name__}")
    channels = x.shape[axis]
    save_mean = check_channel_array(save_mean, channels, "save_mean")
    save_invstd = check_channel_array(save_invstd, channels, "save_invstd")
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weight = check_channel_array(weight, channels, "weight")
    out = check_out(out, dy, may_alias=((dy, "dy"),),
                    must_not_overlap=((x, "x"),) + (((y, "y"),) if relu else ())
                    + _named(weight=weight, save_mean=save_mean, save_invstd=save_invstd))
    layout = plan(x, axis)
    stats = np.concatenate([save_mean, save_invstd]).astype(np.float64, copy=False)
    saved = _dispatch.Saved(layout.dense(x), layout, stats, bool(training),
                            layout.dense(y) if relu else None, bool(residual))
    dx, grads, dresidual = _dispatch.backward(dy, saved, weight, out)
    grad_dtype = weight.dtype if weight is not None else _dispatch.param_dtype(x.dtype)
    dweight, dbias = grads[:channels].astype(grad_dtype), grads[channels:].astype(grad_dtype)
    if residual:
        return dx, dweight, dbias, dresidual
    return dx, dweight, dbias
