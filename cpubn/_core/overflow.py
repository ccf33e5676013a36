"""Exact recomputation of the channels whose kernel sums overflowed.

The float32 kernels sum groups of values in float32 before float64 (a third of the
arithmetic), so a channel whose values or products exceed about 1e37 overflows to inf:
its variance (forward) or gradient sums (backward) come out inf or NaN although every
input is finite.  Detecting that costs one dot product over the per-channel results;
only then are the affected channels recomputed here, in float64 on values scaled by the
channel's largest magnitude (so not even float64 data can overflow), and their outputs
rewritten.  Channels whose inputs hold NaN or Inf keep the kernel's result: NaN and Inf
propagate by design.
"""
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .layout import Layout


def all_finite(values: NDArray[np.float64]) -> bool:
    """True when every value of a small float64 array is finite (a dot product is a
    third of the cost of np.isfinite(...).all() on per-channel arrays)."""
    return math.isfinite(values.dot(values))


def _channel(dense: NDArray[Any], layout: Layout, c: int | np.integer[Any]) -> NDArray[Any]:
    """Channel c of a dense array in the kernels' (N, C, S) view (a view, not a copy)."""
    n, channels, s = layout.kernel_dims
    return dense.reshape(n, channels, s)[:, c, :]


def _finite_channels_with_bad_result(results: NDArray[np.float64],
                                      *arrays_and_layout: Any) -> Iterator[int]:
    *arrays, layout = arrays_and_layout
    for c in np.flatnonzero(~np.isfinite(results)):
        if all(np.isfinite(_channel(a, layout, c)).all() for a in arrays if a is not None):
            yield int(c)


def redo_forward_statistics(x_dense: NDArray[Any], y_dense: NDArray[Any], layout: Layout,
                            stats: NDArray[np.float64], weight: NDArray[Any] | None,
                            bias: NDArray[Any] | None, eps: float,
                            residual_dense: NDArray[Any] | None, relu: bool) -> None:
    """After a batch-statistics forward: for every channel with finite data whose
    variance is not finite, recompute mean, invstd and biased variance (stats, float64)
    and that channel of y.  weight and bias: kernel-ready arrays or None."""
    channels = layout.kernel_dims[1]
    var = stats[2 * channels:]
    for c in list(_finite_channels_with_bad_result(var, x_dense, layout)):
        values = _channel(x_dense, layout, c).astype(np.float64)
        scale = float(np.abs(values).max())
        u = values / scale
        mean_u = u.mean()
        d = u - mean_u
        mean_u += d.mean()                              # two-pass correction
        d = u - mean_u
        var_u = float((d * d).mean())
        with np.errstate(over="ignore"):
            stats[c] = mean_u * scale
            stats[2 * channels + c] = var_u * scale * scale     # inf if beyond float64
            root = math.sqrt(var_u + eps / scale / scale)
            stats[channels + c] = 1.0 / (scale * root)
        normalized = d / root
        gamma = 1.0 if weight is None else float(weight[c])
        beta = 0.0 if bias is None else float(bias[c])
        out = normalized * gamma + beta
        if residual_dense is not None:
            out += _channel(residual_dense, layout, c)
        if relu:
            np.maximum(out, 0.0, out=out)
        with np.errstate(over="ignore"):
            _channel(y_dense, layout, c)[...] = out


# A float x - mean overflows for finite x once |mean| rounds to 2**103 or more (half an
# ulp of float32's largest value); the eval kernel flags such channels, and those whose
# float scale or shift is beyond float32's range.
_FLOAT_MEAN_LIMIT = 2.0 ** 103
_FLOAT_MAX = float(np.finfo(np.float32).max)


def redo_eval_channels(x_dense: NDArray[Any], y_dense: NDArray[Any], layout: Layout,
                       stats: NDArray[np.float64], weight: NDArray[Any] | None,
                       bias: NDArray[Any] | None, residual_dense: NDArray[Any] | None,
                       relu: bool) -> None:
    """After an eval forward computed in float that flagged channels whose constants may
    overflow (a mean of magnitude 2**103 or more, a scale or shift beyond float32): those
    channels of y in float64, rounded once, as the float64 reference gives them.  stats:
    the forward's [mean, invstd] (float64)."""
    channels = layout.kernel_dims[1]
    mean, invstd = stats[:channels], stats[channels:2 * channels]
    gamma = np.ones(channels) if weight is None else weight.astype(np.float64)
    beta = np.zeros(channels) if bias is None else bias.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = invstd * gamma
        mean_hi = mean.astype(np.float32).astype(np.float64)
        shift = beta - (mean - mean_hi) * scale
        flagged = ~((np.abs(mean_hi) < _FLOAT_MEAN_LIMIT) & (np.abs(scale) <= _FLOAT_MAX)
                    & (np.abs(shift) <= _FLOAT_MAX))
    for c in np.flatnonzero(flagged):
        values = _channel(x_dense, layout, c).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            out = (values - mean[c]) * scale[c] + beta[c]
            if residual_dense is not None:
                out += _channel(residual_dense, layout, c)
            if relu:
                np.maximum(out, 0.0, out=out)
            _channel(y_dense, layout, c)[...] = out


def redo_backward_sums(dy_dense: NDArray[Any], x_dense: NDArray[Any], dx_dense: NDArray[Any],
                       y_dense: NDArray[Any] | None, layout: Layout,
                       stats: NDArray[np.float64], weight: NDArray[Any] | None,
                       training: bool, grads: NDArray[np.float64]) -> None:
    """After a backward: for every channel with finite dy and x whose gradient sums
    (grads = [sum dy*xhat, sum dy], float64) are not finite, recompute them and that
    channel of dx.  y_dense: the forward's output with a fused ReLU (its sign is the
    mask), else None."""
    n, channels, s = layout.kernel_dims
    count = n * s
    bad = set(_finite_channels_with_bad_result(grads[:channels], dy_dense, x_dense, layout))
    bad |= set(_finite_channels_with_bad_result(grads[channels:], dy_dense, x_dense, layout))
    for c in sorted(bad):
        dy = _channel(dy_dense, layout, c).astype(np.float64)
        if y_dense is not None:
            dy = np.where(_channel(y_dense, layout, c) > 0, dy, 0.0)
        scale = float(np.abs(dy).max()) or 1.0
        g = dy / scale
        mean, invstd = float(stats[c]), float(stats[channels + c])
        xhat = (_channel(x_dense, layout, c).astype(np.float64) - mean) * invstd
        sum_g, sum_g_xhat = g.sum(), (g * xhat).sum()
        gamma = 1.0 if weight is None else float(weight[c])
        if training:
            dx = gamma * invstd * (g - sum_g / count - xhat * (sum_g_xhat / count))
        else:
            dx = gamma * invstd * g
        with np.errstate(over="ignore"):
            grads[c] = sum_g_xhat * scale
            grads[channels + c] = sum_g * scale
            _channel(dx_dense, layout, c)[...] = dx * scale
