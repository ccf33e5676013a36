"""Fold an eval-mode BatchNorm into a neighbouring linear or convolution layer.

In eval mode BatchNorm is a per-channel affine map, y = scale * x + shift, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``.
Composed with a layer that is itself affine in each channel, it becomes a change of that
layer's weight and bias, so inference pays nothing for the BatchNorm:

* BN after a linear layer or a convolution (``fold_into_linear``, ``fold_into_conv``):
  each output channel's weights are multiplied by ``scale`` and its bias becomes
  ``scale * bias + shift``.
* BN before a linear layer (``fold_into_following_linear``): each input feature's
  weights are multiplied by ``scale`` and the bias gains ``weight @ shift``.

BN before a *convolution* is not offered: a convolution pads its input with zeros, and a
padded zero is not the normalized value of anything, so near the borders no change of the
weights reproduces conv(bn(x)) exactly.  (Without padding it is exact, but a function that
is right only for some convolutions would be a trap.)

A BatchNorm with a fused ``activation="relu"`` folds into the layer before it, which
then computes the BatchNorm's output *before* the activation: apply the ReLU to the
folded layer's output (np.maximum(y, 0)).  It cannot fold into the layer after it, since
the ReLU sits between the two.

Everything is computed in float64 from the BatchNorm's stored running statistics, eps,
weight and bias (gamma = 1, beta = 0 when ``affine=False``), and returned as new arrays in
the dtype of the given weight; the inputs are never modified.  All checks run before any
arithmetic.
"""

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._layers.batchnorm import BatchNorm
from ._core.validation import check_positive_int

__all__ = ["fold_into_linear", "fold_into_conv", "fold_into_following_linear"]

_LINEAR_LAYOUTS = ("out_in", "in_out")

# A folded layer's new (weight, bias), in the dtype of the weight given.
_Folded = tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]


def fold_into_linear(weight: ArrayLike, bias: ArrayLike | None, bn: BatchNorm,
                     weight_layout: str = "out_in") -> _Folded:
    """Fold ``bn`` (eval mode) that follows a linear layer into the layer's weight and bias.

    Returns new ``(weight, bias)`` such that ``x @ W'.T + b'`` equals
    ``bn(x @ W.T + b)`` for the BatchNorm's running statistics.

    weight: (out_features, in_features) as in PyTorch (``weight_layout="out_in"``), or
        (in_features, out_features) with ``weight_layout="in_out"`` (the ``x @ W``
        convention).  float16, float32 or float64; the results have its dtype.
    bias: (out_features,) float array, or None (no bias: one is created).
    bn: a cpubn.BatchNorm in eval mode with running statistics and
        ``num_features == out_features``; its features must be the layer's outputs.
        Its activation, if any, is not part of the fold: apply it to the folded output.
    """
    _check_foldable(bn)
    weight = _float_array(weight, "weight")
    layout = _check_linear_layout(weight_layout)
    _check_ndim(weight, 2, "a linear layer's weight",
                "(out_features, in_features)" if layout == "out_in"
                else "(in_features, out_features)")
    out_axis = 0 if layout == "out_in" else 1
    out_features = weight.shape[out_axis]
    _check_channels(out_features, bn,
                    f"the linear layer has {out_features} output features "
                    f"(weight shape {weight.shape}, weight_layout={layout!r})")
    bias = _check_bias(bias, out_features, "out_features")

    scale, shift = _eval_affine_map(bn)
    scale_shape = (-1, 1) if out_axis == 0 else (1, -1)
    new_weight = weight.astype(np.float64) * scale.reshape(scale_shape)
    return _results(new_weight, _folded_bias(bias, scale, shift), weight.dtype)


def fold_into_conv(weight: ArrayLike, bias: ArrayLike | None, bn: BatchNorm,
                   transposed: bool = False, groups: int = 1) -> _Folded:
    """Fold ``bn`` (eval mode) that follows a convolution into the convolution's weight and
    bias.  Returns new ``(weight, bias)``; stride, padding, dilation and groups of the
    convolution are unaffected and stay as they were.

    weight: a 1-d/2-d/3-d convolution weight in PyTorch's layout: (out_channels,
        in_channels / groups, *kernel) for an ordinary convolution, or (in_channels,
        out_channels / groups, *kernel) with ``transposed=True``.  float16, float32 or
        float64; the results have its dtype.
    bias: (out_channels,) float array, or None (no bias: one is created).
    bn: a cpubn.BatchNorm in eval mode with running statistics and
        ``num_features == out_channels``.  Its activation, if any, is not part of the
        fold: apply it to the folded convolution's output.
    groups: the convolution's groups.  Only a transposed convolution needs it (its axis 1
        holds out_channels / groups, and input-channel group g feeds output channels
        g * out_channels / groups onwards); an ordinary convolution's axis 0 already holds
        every output channel, so there it only has to divide in_channels.
    """
    _check_foldable(bn)
    weight = _float_array(weight, "weight")
    transposed = bool(transposed)
    groups = check_positive_int(groups, "groups")
    if not 3 <= weight.ndim <= 5:
        layout = ("(in_channels, out_channels / groups, *kernel)" if transposed
                  else "(out_channels, in_channels / groups, *kernel)")
        raise ValueError(f"a convolution's weight must have 3 to 5 dimensions {layout}, "
                         f"got shape {weight.shape}")
    if transposed:
        in_channels, out_per_group = weight.shape[0], weight.shape[1]
        if in_channels % groups:
            raise ValueError(f"groups={groups} does not divide the transposed "
                             f"convolution's {in_channels} input channels "
                             f"(weight shape {weight.shape})")
        out_channels = out_per_group * groups
        described = (f"the transposed convolution has {out_channels} output channels "
                     f"(weight shape {weight.shape}, groups={groups})")
    else:
        out_channels = weight.shape[0]
        described = (f"the convolution has {out_channels} output channels "
                     f"(weight shape {weight.shape})")
    _check_channels(out_channels, bn, described)
    bias = _check_bias(bias, out_channels, "out_channels")

    scale, shift = _eval_affine_map(bn)
    weight64 = weight.astype(np.float64)
    kernel_ones = (1,) * (weight.ndim - 2)
    if transposed:
        # Split axis 0 into (groups, in_channels / groups): axis 2 of the view is then the
        # output channel within the group, and group g's scales are the g-th block of
        # out_per_group entries of scale.
        grouped = weight64.reshape((groups, in_channels // groups) + weight.shape[1:])
        grouped = grouped * scale.reshape((groups, 1, out_per_group) + kernel_ones)
        new_weight = grouped.reshape(weight.shape)
    else:
        new_weight = weight64 * scale.reshape((-1, 1) + kernel_ones)
    return _results(new_weight, _folded_bias(bias, scale, shift), weight.dtype)


def fold_into_following_linear(bn: BatchNorm, weight: ArrayLike, bias: ArrayLike | None,
                               weight_layout: str = "out_in") -> _Folded:
    """Fold ``bn`` (eval mode) that *precedes* a linear layer into the layer's weight and
    bias.  Returns new ``(weight, bias)`` such that ``x @ W'.T + b'`` equals
    ``bn(x) @ W.T + b``.

    Only valid when the BatchNorm's features are the linear layer's input features
    (``num_features == in_features``, with the linear layer acting on the BN's feature
    axis).  There is no conv counterpart: a convolution's zero padding is applied after
    the BatchNorm, so no change of the convolution's weights matches it at the borders
    (see the module docstring).

    weight: (out_features, in_features) as in PyTorch (``weight_layout="out_in"``), or
        (in_features, out_features) with ``weight_layout="in_out"``.  float16, float32 or
        float64; the results have its dtype.
    bias: (out_features,) float array, or None (no bias: one is created).
    bn: a cpubn.BatchNorm in eval mode with running statistics and no fused activation
        (a ReLU between the BatchNorm and the layer cannot be folded).
    """
    _check_foldable(bn)
    if bn.activation is not None:
        raise ValueError(f"cannot fold {bn!r} into the following linear layer: its "
                         f"activation {bn.activation!r} sits between the two")
    weight = _float_array(weight, "weight")
    layout = _check_linear_layout(weight_layout)
    _check_ndim(weight, 2, "a linear layer's weight",
                "(out_features, in_features)" if layout == "out_in"
                else "(in_features, out_features)")
    in_axis = 1 if layout == "out_in" else 0
    in_features, out_features = weight.shape[in_axis], weight.shape[1 - in_axis]
    _check_channels(in_features, bn,
                    f"the linear layer has {in_features} input features "
                    f"(weight shape {weight.shape}, weight_layout={layout!r})")
    bias = _check_bias(bias, out_features, "out_features")

    scale, shift = _eval_affine_map(bn)
    weight64 = weight.astype(np.float64)
    if in_axis == 1:
        new_weight = weight64 * scale.reshape(1, -1)
        shift_term = weight64 @ shift
    else:
        new_weight = weight64 * scale.reshape(-1, 1)
        shift_term = shift @ weight64
    new_bias = shift_term if bias is None else bias.astype(np.float64) + shift_term
    return _results(new_weight, new_bias, weight.dtype)


# ---------------------------------------------------------------------- checks and helpers
def _check_foldable(bn: object) -> None:
    """An eval-mode BatchNorm with running statistics, or an error saying why not."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a cpubn.BatchNorm, got {type(bn).__name__}")
    if bn.num_features is None:
        raise ValueError(f"cannot fold {bn!r}: it has not inferred num_features yet (run a "
                         f"forward pass or load a state dict first)")
    if bn.training:
        raise ValueError("cannot fold a BatchNorm in training mode: it normalizes with "
                         "batch statistics, which no fixed weights reproduce; call "
                         "bn.eval() first")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics "
                         "(track_running_stats=False): it normalizes with batch statistics "
                         "even in eval mode")
    var_plus_eps = np.asarray(bn.running_var, dtype=np.float64) + bn.eps
    if np.any(var_plus_eps <= 0):
        raise ValueError(f"cannot fold: running_var + eps must be positive, got minimum "
                         f"{var_plus_eps.min()!r}")


def _eval_affine_map(bn: BatchNorm) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(scale, shift) in float64 with bn(x) = scale * x + shift per channel (eval mode)."""
    scale = 1.0 / np.sqrt(np.asarray(bn.running_var, dtype=np.float64) + bn.eps)
    if bn.affine:
        scale = scale * np.asarray(bn.weight, dtype=np.float64)
    shift = -np.asarray(bn.running_mean, dtype=np.float64) * scale
    if bn.affine:
        shift = shift + np.asarray(bn.bias, dtype=np.float64)
    return scale, shift


def _float_array(value: object, name: str) -> NDArray[Any]:
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged lists and other non-array objects
        raise TypeError(f"{name} must be a float array, "
                        f"got {type(value).__name__}") from exc
    if array.dtype.kind != "f" or array.dtype.itemsize > 8:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, "
                        f"got {array.dtype}")
    return array


def _check_linear_layout(weight_layout: object) -> str:
    if not (isinstance(weight_layout, str) and weight_layout in _LINEAR_LAYOUTS):
        raise ValueError(f"weight_layout must be 'out_in' (PyTorch's (out_features, "
                         f"in_features)) or 'in_out', got {weight_layout!r}")
    return weight_layout


def _check_ndim(weight: NDArray[Any], ndim: int, what: str, layout: str) -> None:
    if weight.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions {layout}, "
                         f"got shape {weight.shape}")




def _check_channels(layer_channels: int, bn: BatchNorm, described: str) -> None:
    if layer_channels != bn.num_features:
        raise ValueError(f"channel count mismatch: {described}, but the BatchNorm has "
                         f"num_features={bn.num_features}")


def _check_bias(bias: object, length: int, length_name: str) -> NDArray[Any] | None:
    if bias is None:
        return None
    array = _float_array(bias, "bias")
    if array.shape != (length,):
        raise ValueError(f"bias has shape {array.shape}, expected ({length},) "
                         f"({length_name})")
    return array


def _folded_bias(bias: NDArray[Any] | None, scale: NDArray[np.float64],
                 shift: NDArray[np.float64]) -> NDArray[np.float64]:
    """scale * bias + shift; a missing bias counts as zero."""
    if bias is None:
        return shift
    return bias.astype(np.float64) * scale + shift


def _results(new_weight: NDArray[np.float64], new_bias: NDArray[np.float64],
             dtype: np.dtype[Any]) -> _Folded:
    # Native byte order, so the results are ordinary arrays whatever the input was.
    native = np.dtype(dtype.type)
    return new_weight.astype(native, copy=False), new_bias.astype(native, copy=False)
