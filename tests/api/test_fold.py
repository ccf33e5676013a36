"""Folding an eval-mode BatchNorm into a neighbouring linear or convolution layer.

The check is always the one a user cares about: the model with the BatchNorm (cpubn's
own eval forward) and the model with the folded layer give the same outputs.  The
convolutions are small direct NumPy implementations below, themselves checked against
a pixel-by-pixel definition (and the transposed one as the adjoint of the convolution).
"""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import cpubn
from bn_testing import bitwise_equal
from cpubn._layers.lazy import LazyBatchNorm
from cpubn.fold import fold_into_conv, fold_into_following_linear, fold_into_linear

# Relative to the largest output: float64 to 1e-12, float32 to 1e-5 (the targets).
MODEL_TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPE_IDS = ["f32", "f64"]


# ---------------------------------------------------------------------- small layers
def linear(x, weight, bias, weight_layout="out_in"):
    y = x @ (weight.T if weight_layout == "out_in" else weight)
    return y if bias is None else y + bias


def conv(x, weight, bias=None, padding=0, groups=1):
    """Direct N-d convolution (cross-correlation, stride 1), PyTorch weight layout
    (out, in / groups, *kernel), channels-first x."""
    spatial = weight.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(padding, padding)] * spatial)
    # windows: (N, C_in, *out_positions, *kernel)
    windows = sliding_window_view(x, weight.shape[2:], axis=tuple(range(2, 2 + spatial)))
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    windows = windows.reshape((n, groups, c_in // groups) + windows.shape[2:])
    w = weight.reshape((groups, c_out // groups) + weight.shape[1:])
    pos, ker = "HWD"[:spatial], "hwd"[:spatial]
    y = np.einsum(f"ngc{pos}{ker},gfc{ker}->ngf{pos}", windows, w)
    y = y.reshape((n, c_out) + y.shape[3:])
    return y if bias is None else y + bias.reshape((-1,) + (1,) * spatial)


def conv_transpose2d(x, weight, bias=None, stride=1, groups=1):
    """Transposed 2-d convolution by its definition: every input pixel scatters
    ``x[n, c, i, j] * weight[c, f]`` onto the output at (i * stride, j * stride).
    weight: (in, out / groups, kh, kw) as in PyTorch."""
    n, c_in, h, w = x.shape
    _, out_per_group, kh, kw = weight.shape
    y = np.zeros((n, out_per_group * groups, (h - 1) * stride + kh, (w - 1) * stride + kw),
                 np.result_type(x, weight))
    xg = x.reshape(n, groups, c_in // groups, h, w)
    wg = weight.reshape(groups, c_in // groups, out_per_group, kh, kw)
    for p in range(kh):
        for q in range(kw):
            contrib = np.einsum("ngcij,gcf->ngfij", xg, wg[..., p, q])
            y[:, :, p:p + stride * h:stride, q:q + stride * w:stride] += \
                contrib.reshape(n, -1, h, w)
    return y if bias is None else y + bias.reshape(-1, 1, 1)


# ---------------------------------------------------------------------- fixtures
def trained_bn(rng, channels, dtype, affine=True, feature_shape=()):
    """An eval-mode BatchNorm with random gamma/beta and running statistics far from 0/1,
    reached by a few training steps on shifted, scaled data."""
    bn = cpubn.BatchNorm(channels, affine=affine, momentum=0.5, dtype=dtype)
    if affine:
        bn.weight[...] = rng.uniform(0.5, 2.0, channels)
        bn.bias[...] = rng.uniform(-1.0, 1.0, channels)
    shape = (6, channels) + feature_shape
    bshape = (1, channels) + (1,) * len(feature_shape)
    for _ in range(3):
        x = (rng.standard_normal(shape) * rng.uniform(0.3, 3.0, channels).reshape(bshape)
             + rng.uniform(-3.0, 3.0, channels).reshape(bshape))
        bn(x.astype(dtype))
    assert np.abs(bn.running_mean).max() > 0.3 and np.abs(bn.running_var - 1).max() > 0.3
    return bn.eval()


def assert_same_outputs(got, expected, dtype):
    assert got.dtype == expected.dtype == dtype
    scale = float(np.abs(expected.astype(np.float64)).max())
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64),
                               rtol=MODEL_TOL[dtype], atol=MODEL_TOL[dtype] * scale)


def bn_state(bn):
    return {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}


def assert_untouched(arrays_before, arrays_now, bn, bn_before):
    for before, now in zip(arrays_before, arrays_now):
        if before is not None:
            assert bitwise_equal(now, before)
    after = bn.state_dict()
    assert set(after) == set(bn_before)
    for key, value in bn_before.items():
        assert bitwise_equal(after[key], value), key
    assert not bn.training


# ---------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fold_into_linear_same_outputs(dtype, affine, weight_layout, with_bias, rng):
    n_in, n_out = 5, 7
    bn = trained_bn(rng, n_out, dtype, affine)
    shape = (n_out, n_in) if weight_layout == "out_in" else (n_in, n_out)
    weight = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype) if with_bias else None
    x = rng.standard_normal((9, n_in)).astype(dtype)

    w2, b2 = fold_into_linear(weight, bias, bn, weight_layout=weight_layout)
    assert w2.shape == weight.shape and b2.shape == (n_out,)
    assert w2.dtype == b2.dtype == dtype
    assert_same_outputs(linear(x, w2, b2, weight_layout), bn(linear(x, weight, bias,
                                                                    weight_layout)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spatial,groups,padding", [(2, 1, 1), (2, 2, 0), (1, 1, 1), (3, 1, 0)],
                         ids=["2d", "2d-groups", "1d", "3d"])
def test_fold_into_conv_same_outputs(dtype, affine, with_bias, spatial, groups, padding, rng):
    c_in, c_out, k = 4, 6, 3
    size = (5, 4, 3)[:spatial]
    bn = trained_bn(rng, c_out, dtype, affine, feature_shape=(2,) * spatial)
    weight = rng.standard_normal((c_out, c_in // groups) + (k,) * spatial).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    x = rng.standard_normal((2, c_in) + size).astype(dtype)

    w2, b2 = fold_into_conv(weight, bias, bn)
    assert w2.shape == weight.shape and w2.dtype == b2.dtype == dtype
    assert_same_outputs(conv(x, w2, b2, padding, groups),
                        bn(conv(x, weight, bias, padding, groups)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (2, 2)])
def test_fold_into_transposed_conv_same_outputs(dtype, affine, groups, stride, rng):
    c_in, out_per_group = 4, 3
    c_out = out_per_group * groups
    bn = trained_bn(rng, c_out, dtype, affine, feature_shape=(2, 2))
    weight = rng.standard_normal((c_in, out_per_group, 3, 2)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    x = rng.standard_normal((2, c_in, 3, 4)).astype(dtype)

    w2, b2 = fold_into_conv(weight, bias, bn, transposed=True, groups=groups)
    assert w2.shape == weight.shape and w2.dtype == b2.dtype == dtype
    assert_same_outputs(conv_transpose2d(x, w2, b2, stride, groups),
                        bn(conv_transpose2d(x, weight, bias, stride, groups)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("weight_layout", ["out_in", "in_out"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fold_into_following_linear_same_outputs(dtype, affine, weight_layout, with_bias, rng):
    n_in, n_out = 6, 4
    bn = trained_bn(rng, n_in, dtype, affine)
    shape = (n_out, n_in) if weight_layout == "out_in" else (n_in, n_out)
    weight = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype) if with_bias else None
    x = (rng.standard_normal((9, n_in)) * 2 + 1).astype(dtype)

    w2, b2 = fold_into_following_linear(bn, weight, bias, weight_layout=weight_layout)
    assert w2.shape == weight.shape and b2.shape == (n_out,)
    assert w2.dtype == b2.dtype == dtype
    assert_same_outputs(linear(x, w2, b2, weight_layout),
                        linear(bn(x), weight, bias, weight_layout), dtype)


def test_fold_channels_last_bn_after_linear_on_sequences(rng):
    # A linear layer over the last axis of (N, L, in) data, then BN on axis=-1.
    bn = cpubn.BatchNorm(5, axis=-1, dtype=np.float64)
    bn(rng.standard_normal((4, 3, 5)) * 2 + 1)
    bn.eval()
    weight, bias = rng.standard_normal((5, 3)), rng.standard_normal(5)
    x = rng.standard_normal((2, 6, 3))
    w2, b2 = fold_into_linear(weight, bias, bn)
    assert_same_outputs(linear(x, w2, b2), bn(linear(x, weight, bias)), np.float64)


def test_fold_known_values():
    # One channel, worked by hand: scale = 4 / sqrt(3 + 1) = 2, shift = 5 - 4 * 2 = -3.
    bn = cpubn.BatchNorm(1, eps=1.0, dtype=np.float64).eval()
    bn.weight[...], bn.bias[...] = 4.0, 5.0
    bn.running_mean[...], bn.running_var[...] = 4.0, 3.0
    w, b = fold_into_linear(np.array([[1.0, -2.0]]), np.array([0.5]), bn)
    np.testing.assert_array_equal(w, [[2.0, -4.0]])
    np.testing.assert_array_equal(b, [2 * 0.5 - 3])
    w, b = fold_into_following_linear(bn, np.array([[3.0], [1.0]]), None)
    np.testing.assert_array_equal(w, [[6.0], [2.0]])
    np.testing.assert_array_equal(b, [-9.0, -3.0])


def test_fold_float16_weight_keeps_dtype(rng):
    bn = trained_bn(rng, 3, np.float32)
    weight = rng.standard_normal((3, 2)).astype(np.float16)
    w2, b2 = fold_into_linear(weight, None, bn)
    assert w2.dtype == b2.dtype == np.float16
    expected, _ = fold_into_linear(weight.astype(np.float64), None, bn)
    np.testing.assert_array_equal(w2, expected.astype(np.float16))


def test_fold_accepts_float32_bn_with_float64_weights(rng):
    bn = trained_bn(rng, 4, np.float32)
    weight = rng.standard_normal((4, 3))
    w2, b2 = fold_into_linear(weight, None, bn)
    assert w2.dtype == b2.dtype == np.float64
    # Folded from the float32 statistics' exact values.
    scale = bn.weight.astype(np.float64) / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    np.testing.assert_allclose(w2, weight * scale[:, None], rtol=1e-15)


def test_fold_lists_are_accepted():
    bn = cpubn.BatchNorm(2).eval()
    w, b = fold_into_linear([[1.0, 2.0], [3.0, 4.0]], [0.0, 1.0], bn)
    assert w.dtype == np.float64 and b.shape == (2,)


def naive_conv2d(x, weight, stride=1, padding=0, groups=1):
    """Convolution one output pixel at a time, straight from the definition."""
    x = np.pad(x, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    n, c_in, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    out_per_group = c_out // groups
    y = np.zeros((n, c_out, (h - kh) // stride + 1, (w - kw) // stride + 1))
    for o in range(c_out):
        first = (o // out_per_group) * c_per_group
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                patch = x[:, first:first + c_per_group,
                          i * stride:i * stride + kh, j * stride:j * stride + kw]
                y[:, o, i, j] = (patch * weight[o]).sum(axis=(1, 2, 3))
    return y


def test_reference_conv_matches_naive_definition(rng):
    x, w, b = (rng.standard_normal((2, 4, 5, 4)), rng.standard_normal((6, 2, 3, 2)),
               rng.standard_normal(6))
    expected = naive_conv2d(x, w, padding=1, groups=2) + b.reshape(-1, 1, 1)
    np.testing.assert_allclose(conv(x, w, b, padding=1, groups=2), expected, atol=1e-12)
    # 1-d: the same as a 2-d convolution over a height-1 image.
    x1, w1 = rng.standard_normal((2, 3, 7)), rng.standard_normal((4, 3, 3))
    np.testing.assert_allclose(conv(x1, w1, padding=1),
                               naive_conv2d(x1[:, :, None], w1[:, :, None],
                                            padding=1)[:, :, 1], atol=1e-12)


@pytest.mark.parametrize("groups,stride", [(1, 1), (1, 2), (2, 2)])
def test_reference_conv_transpose_is_adjoint_of_conv(groups, stride, rng):
    # A transposed convolution is the adjoint (gradient) of the convolution with the same
    # weight, stride and groups: <conv_t(x), z> == <x, conv(z)> for every x and z.
    weight = rng.standard_normal((4, 3, 3, 2))      # (in, out / groups, kh, kw)
    x = rng.standard_normal((2, 4, 3, 4))
    y = conv_transpose2d(x, weight, stride=stride, groups=groups)
    z = rng.standard_normal(y.shape)
    adjoint = naive_conv2d(z, weight, stride=stride, groups=groups)
    assert adjoint.shape == x.shape
    np.testing.assert_allclose(np.vdot(y, z), np.vdot(x, adjoint), rtol=1e-12)


# ---------------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS)
def test_inputs_not_modified_and_results_are_new(dtype, rng):
    bn = trained_bn(rng, 4, dtype)
    cases = [
        (fold_into_linear, lambda w, b: (w, b, bn), rng.standard_normal((4, 3)), 4),
        (fold_into_linear, lambda w, b: (w, b, bn, "in_out"), rng.standard_normal((3, 4)), 4),
        (fold_into_conv, lambda w, b: (w, b, bn), rng.standard_normal((4, 2, 3, 3)), 4),
        (fold_into_conv, lambda w, b: (w, b, bn, True), rng.standard_normal((2, 4, 3)), 4),
        (fold_into_following_linear, lambda w, b: (bn, w, b), rng.standard_normal((5, 4)), 5),
        (fold_into_following_linear, lambda w, b: (bn, w, b, "in_out"),
         rng.standard_normal((4, 5)), 5),
    ]
    for fold, args, weight, n_bias in cases:
        weight = weight.astype(dtype)
        bias = rng.standard_normal(n_bias).astype(dtype)
        for b in (bias, None):
            before = (weight.copy(), None if b is None else b.copy())
            bn_before = bn_state(bn)
            w2, b2 = fold(*args(weight, b))
            assert_untouched(before, (weight, b), bn, bn_before)
            assert not np.shares_memory(w2, weight)
            assert b is None or not np.shares_memory(b2, b)
            for state_array in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                assert not np.shares_memory(b2, state_array)
            w2[...] = 0
            b2[...] = 0
            assert_untouched(before, (weight, b), bn, bn_before)


def test_read_only_inputs_are_fine(rng):
    bn = trained_bn(rng, 3, np.float64)
    weight, bias = rng.standard_normal((3, 2)), rng.standard_normal(3)
    weight.flags.writeable = bias.flags.writeable = False
    w2, b2 = fold_into_linear(weight, bias, bn)
    assert w2.flags.writeable and b2.flags.writeable


# ---------------------------------------------------------------------- errors
ALL_FOLDS = {
    "linear": lambda bn, w, b, **kw: fold_into_linear(w, b, bn, **kw),
    "conv": lambda bn, w, b, **kw: fold_into_conv(w, b, bn, **kw),
    "following": lambda bn, w, b, **kw: fold_into_following_linear(bn, w, b, **kw),
}
GOOD_WEIGHT = {"linear": (3, 2), "conv": (3, 2, 3, 3), "following": (2, 3)}
GOOD_BIAS = {"linear": 3, "conv": 3, "following": 2}


def good_args(kind, dtype=np.float32):
    return np.ones(GOOD_WEIGHT[kind], dtype), np.zeros(GOOD_BIAS[kind], dtype)


@pytest.mark.parametrize("kind", ALL_FOLDS)
def test_good_args_are_good(kind):
    # The error tests below change one thing at a time from these.
    w2, b2 = ALL_FOLDS[kind](cpubn.BatchNorm(3).eval(), *good_args(kind))
    assert w2.shape == GOOD_WEIGHT[kind]


@pytest.mark.parametrize("kind", ALL_FOLDS)
def test_error_training_mode(kind):
    with pytest.raises(ValueError, match="training mode.*bn.eval()"):
        ALL_FOLDS[kind](cpubn.BatchNorm(3), *good_args(kind))


@pytest.mark.parametrize("kind", ALL_FOLDS)
def test_error_no_running_stats(kind):
    bn = cpubn.BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="without running statistics"):
        ALL_FOLDS[kind](bn, *good_args(kind))


@pytest.mark.parametrize("kind", ALL_FOLDS)
def test_error_channel_mismatch_shows_both_counts(kind):
    bn = cpubn.BatchNorm(5).eval()
    with pytest.raises(ValueError, match=r"mismatch: .* 3 .*num_features=5"):
        ALL_FOLDS[kind](bn, *good_args(kind))


def test_error_channel_mismatch_per_layout_and_transposed():
    bn = cpubn.BatchNorm(3).eval()
    with pytest.raises(ValueError, match=r"2 output features .*'in_out'.*num_features=3"):
        fold_into_linear(np.ones((3, 2)), None, bn, weight_layout="in_out")
    with pytest.raises(ValueError, match=r"2 input features .*'in_out'.*num_features=3"):
        fold_into_following_linear(bn, np.ones((2, 3)), None, weight_layout="in_out")
    with pytest.raises(ValueError, match=r"transposed convolution has 2 output.*num_features=3"):
        fold_into_conv(np.ones((3, 2, 3, 3)), None, bn, transposed=True)
    with pytest.raises(ValueError, match=r"has 4 output channels .*groups=2.*num_features=3"):
        fold_into_conv(np.ones((4, 2, 3, 3)), None, bn, transposed=True, groups=2)


@pytest.mark.parametrize("kind,shape", [("linear", (3,)), ("linear", (3, 2, 1)),
                                        ("following", (2,)), ("following", (2, 3, 1)),
                                        ("conv", (3, 2)), ("conv", (3, 2, 1, 1, 1, 1)),
                                        ("conv", ())])
def test_error_weight_ndim(kind, shape):
    bn = cpubn.BatchNorm(3).eval()
    with pytest.raises(ValueError, match="dimensions.*got shape"):
        ALL_FOLDS[kind](bn, np.ones(shape, np.float32), None)


@pytest.mark.parametrize("kind", ALL_FOLDS)
@pytest.mark.parametrize("bias_shape", [(4,), (1,), (), (3, 1), (2, 3)])
def test_error_bias_shape(kind, bias_shape):
    weight, bias = good_args(kind)
    if bias_shape == bias.shape:
        bias_shape = (9,)
    with pytest.raises(ValueError, match="bias has shape"):
        ALL_FOLDS[kind](cpubn.BatchNorm(3).eval(), weight, np.zeros(bias_shape, np.float32))


@pytest.mark.parametrize("kind", ALL_FOLDS)
@pytest.mark.parametrize("bad", [np.int64, np.int32, np.bool_, np.complex128, object])
def test_error_non_float_dtypes(kind, bad):
    bn = cpubn.BatchNorm(3).eval()
    weight, bias = good_args(kind)
    with pytest.raises(TypeError, match="weight must have dtype float"):
        ALL_FOLDS[kind](bn, weight.astype(bad), bias)
    with pytest.raises(TypeError, match="bias must have dtype float"):
        ALL_FOLDS[kind](bn, weight, bias.astype(bad))


def test_error_other_bad_arguments():
    bn = cpubn.BatchNorm(3).eval()
    with pytest.raises(TypeError, match="bn must be a cpubn.BatchNorm"):
        fold_into_linear(np.ones((3, 2)), None, object())
    for layout in ("in-out", "OUT_IN", None, ("out_in",)):
        with pytest.raises(ValueError, match="weight_layout must be"):
            fold_into_linear(np.ones((3, 2)), None, bn, weight_layout=layout)
        with pytest.raises(ValueError, match="weight_layout must be"):
            fold_into_following_linear(bn, np.ones((2, 3)), None, weight_layout=layout)
    with pytest.raises(TypeError, match="weight must be a float array"):
        fold_into_linear([[1.0, 2.0], [3.0]], None, bn)
    with pytest.raises(TypeError, match="groups must be a positive int"):
        fold_into_conv(np.ones((3, 2, 3)), None, bn, groups=1.5)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        fold_into_conv(np.ones((3, 2, 3)), None, bn, groups=0)
    with pytest.raises(ValueError, match="groups=2 does not divide .* 3 input channels"):
        fold_into_conv(np.ones((3, 3, 3)), None, bn, transposed=True, groups=2)
    bn.running_var[...] = -5.0
    with pytest.raises(ValueError, match="running_var \\+ eps must be positive"):
        fold_into_linear(np.ones((3, 2)), None, bn)


def test_error_unmaterialized_lazy_then_works(rng):
    lazy = LazyBatchNorm().eval()
    with pytest.raises(ValueError, match="has not inferred num_features"):
        fold_into_linear(np.ones((3, 2)), None, lazy)
    lazy.train()
    lazy(rng.standard_normal((4, 3)).astype(np.float32))
    w2, b2 = fold_into_linear(np.ones((3, 2), np.float32), None, lazy.eval())
    x = rng.standard_normal((5, 2)).astype(np.float32)
    assert_same_outputs(linear(x, w2, b2), lazy(linear(x, np.ones((3, 2), np.float32), None)),
                        np.float32)


def test_errors_checked_before_bias_or_weight_is_read():
    # The BN check comes first: a training-mode BN is reported even with a bad weight.
    with pytest.raises(ValueError, match="training mode"):
        fold_into_conv(np.ones((3,), np.int64), "not a bias", cpubn.BatchNorm(3))
