"""The functional API, mirroring torch.nn.functional.batch_norm and ATen's
native_batch_norm / native_batch_norm_backward.  Validation, then dispatch."""
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._core import dispatch
from ._core.layout import plan
from ._core.validation import (check_activation, check_batch_stats_possible, check_bool,
                               check_channel_array, check_data, check_eps, check_like,
                               check_momentum, check_out, check_residual, check_state_array)


def _check_running_buffer(buffer: object, channels: int, name: str,
                          training: bool) -> NDArray[Any] | None:
    if training and buffer is not None:
        # Updated in place: a list or a read-only array would silently not be.
        return check_state_array(buffer, channels, name)
    return check_channel_array(buffer, channels, name)


def _named(**arrays: object) -> tuple[tuple[object, str], ...]:
    """(array, name) pairs of the given per-channel arrays, for check_out."""
    return tuple((a, name) for name, a in arrays.items())


def batch_norm_forward(x: ArrayLike, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, running_mean: NDArray[Any] | None = None,
                       running_var: NDArray[Any] | None = None, training: bool = True,
                       momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
                       out: NDArray[Any] | None = None, activation: str | None = None,
                       residual: ArrayLike | None = None
                       ) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:
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

    An empty batch (a zero-length axis other than the feature axis) gives an empty y, as
    in PyTorch, and moves no running statistic; save_mean and save_invstd are then NaN in
    training (the statistics of no values) and the running ones' in eval.
    """
    data, feature_axis = check_data(x, axis)
    training = check_bool(training, "training")
    relu = check_activation(activation) is not None
    residual_array = None if residual is None else check_residual(residual, data)
    channels = data.shape[feature_axis]
    eps = check_eps(eps)
    momentum_value = check_momentum(momentum, allow_none=False)
    weights = check_channel_array(weight, channels, "weight")
    biases = check_channel_array(bias, channels, "bias")
    running_mean = _check_running_buffer(running_mean, channels, "running_mean", training)
    running_var = _check_running_buffer(running_var, channels, "running_var", training)
    if out is not None:
        out = check_out(out, data, may_alias=((data, "the input"),),
                        must_not_overlap=_named(weight=weights, bias=biases,
                                                running_mean=running_mean,
                                                running_var=running_var)
                        + (() if residual_array is None
                           else ((residual_array, "the residual"),)))
    if data.size == 0:
        return _forward_empty_batch(data, channels, out, running_mean, running_var, training,
                                    eps)
    if training:
        check_batch_stats_possible(data, feature_axis)
        y, saved = dispatch.forward(data, feature_axis, weights, biases, eps, out,
                                     residual=residual_array, relu=relu)
        assert momentum_value is not None           # allow_none=False
        dispatch.update_running_stats(running_mean, running_var, saved.mean, saved.batch_var,
                                       momentum_value, None, count=data.size // channels)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        y, saved = dispatch.forward(data, feature_axis, weights, biases, eps, out,
                                     running_mean, running_var, residual=residual_array,
                                     relu=relu)
    stats = saved.stats                 # mean, invstd(, batch variance) back to back
    return y, stats[:channels], stats[channels:2 * channels]


def _forward_empty_batch(data: NDArray[Any], channels: int, out: NDArray[Any] | None,
                         running_mean: NDArray[Any] | None, running_var: NDArray[Any] | None,
                         training: bool, eps: float
                         ) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:
    """An empty batch, as PyTorch takes one: an empty y and no running statistic moved.
    The statistics of no values are NaN in training; in eval they are the running ones."""
    y = np.empty_like(data) if out is None else out
    if training:
        return y, np.full(channels, np.nan), np.full(channels, np.nan)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    mean = np.asarray(running_mean, np.float64)
    return y, mean.copy(), 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)


def batch_norm(x: ArrayLike, running_mean: NDArray[Any] | None, running_var: NDArray[Any] | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
               out: NDArray[Any] | None = None, activation: str | None = None,
               residual: ArrayLike | None = None) -> NDArray[Any]:
    """Like torch.nn.functional.batch_norm: returns y; in training mode the running
    statistics (if not None) are updated in place.  ``activation="relu"`` and
    ``residual`` fuse relu(bn(x) + residual) into the same pass.  See batch_norm_forward."""
    return batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis, out, activation, residual)[0]


_Grads = tuple[NDArray[Any], NDArray[Any], NDArray[Any]]
_GradsResidual = tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]


@overload
def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None,
                        training: bool = True, axis: int = 1, out: NDArray[Any] | None = None,
                        activation: str | None = None, y: ArrayLike | None = None,
                        residual: Literal[False] = False) -> _Grads: ...
@overload
def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None,
                        training: bool = True, axis: int = 1, out: NDArray[Any] | None = None,
                        activation: str | None = None, y: ArrayLike | None = None, *,
                        residual: Literal[True]) -> _GradsResidual: ...
@overload
def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None,
                        training: bool = True, axis: int = 1, out: NDArray[Any] | None = None,
                        activation: str | None = None, y: ArrayLike | None = None,
                        residual: bool = False) -> _Grads | _GradsResidual: ...
def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None,
                        training: bool = True, axis: int = 1, out: NDArray[Any] | None = None,
                        activation: str | None = None, y: ArrayLike | None = None,
                        residual: bool = False) -> _Grads | _GradsResidual:
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
    data, feature_axis = check_data(x, axis, name="x")
    training = check_bool(training, "training")
    grad_y = check_like(dy, data.shape, data.dtype, "dy", "x")
    relu = check_activation(activation) is not None
    output = None
    if relu:
        if y is None:
            raise ValueError("batch_norm_backward with activation='relu' needs y, the "
                             "forward's output (its sign is the ReLU mask)")
        output = check_like(y, data.shape, data.dtype, "y", "x")
    elif y is not None:
        raise ValueError("y (the forward's output) is only used with activation='relu'; "
                         "pass the activation the forward used")
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual must be True or False (whether the forward added a "
                        f"residual), got {type(residual).__name__}")
    channels = data.shape[feature_axis]
    mean = check_channel_array(save_mean, channels, "save_mean")
    invstd = check_channel_array(save_invstd, channels, "save_invstd")
    if mean is None or invstd is None:
        raise ValueError("save_mean and save_invstd are required")
    weights = check_channel_array(weight, channels, "weight")
    if out is not None:
        out = check_out(out, grad_y, may_alias=((grad_y, "dy"),),
                        must_not_overlap=((data, "x"),) + (((output, "y"),) if relu else ())
                        + _named(weight=weights, save_mean=mean, save_invstd=invstd))
    grad_dtype = weights.dtype if weights is not None else dispatch.param_dtype(data.dtype)
    if data.size == 0:                  # an empty batch: nothing flows, nothing adds up
        dx = np.empty_like(grad_y) if out is None else out
        zeros = np.zeros(channels, grad_dtype)
        if residual:
            return dx, zeros, zeros.copy(), np.empty_like(grad_y)
        return dx, zeros, zeros.copy()
    layout = plan(data, feature_axis)
    stats = np.concatenate([mean, invstd]).astype(np.float64, copy=False)
    saved = dispatch.Saved(layout.dense(data), layout, stats, bool(training),
                            layout.dense(output) if output is not None else None,
                            bool(residual))
    dx, grads, dresidual = dispatch.backward(grad_y, saved, weights, out)
    dweight, dbias = grads[:channels].astype(grad_dtype), grads[channels:].astype(grad_dtype)
    if residual:
        assert dresidual is not None                # the Saved had residual=True
        return dx, dweight, dbias, dresidual
    return dx, dweight, dbias
