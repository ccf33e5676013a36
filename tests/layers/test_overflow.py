"""Large finite float32 data and gradients: the sums that float32 would overflow are
exact (cpubn._core.overflow redoes them wider), and a NaN stays in its own channel."""
import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import bitwise_equal, normal_data

# (shape, axis): channels-first runs short and long, channels-last rows few and many.
SHAPES = [((64, 3), 1), ((8, 3, 40), 1), ((4, 3, 3000), 1), ((8, 5, 3), -1), ((3000, 3), -1)]


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_large_finite_float32_data_is_normalized_exactly(shape, axis, scale, rng):
    x = normal_data(rng, shape, scale)
    bn = cpubn.BatchNorm(3, axis=axis)
    y = bn(x)
    expected, mean, invstd, _, _ = ref.functional_forward(x, axis=axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_large_finite_gradients_are_exact(shape, axis, training, rng):
    x = normal_data(rng, shape, 1e19)
    dy = normal_data(rng, shape, 1e33)          # dy * (x - mean) overflows float32; the sums do not
    bn = cpubn.BatchNorm(3, axis=axis)
    bn(x)                                   # fills the running statistics
    bn.train(training)
    bn(x)
    dx = bn.backward(dy)
    if training:
        _, mean, invstd, _, _ = ref.functional_forward(x, axis=axis)
    else:
        mean = bn.running_mean.astype(np.float64)
        invstd = ref.invstd_of(bn.running_var, bn.eps)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, training=training, axis=axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6 * np.abs(dx_ref).max())
    np.testing.assert_allclose(bn.grad_weight, dw_ref, rtol=1e-5)
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-5,
                               atol=1e-6 * np.abs(dy).sum(axis=tuple(
                                   i for i in range(dy.ndim) if i != axis % dy.ndim)).max())


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_nan_still_propagates_only_in_its_channel(shape, axis, rng):
    x = normal_data(rng, shape, 1e30)
    index = [0] * x.ndim
    index[axis % x.ndim] = 1
    x[tuple(index)] = np.nan
    y = cpubn.BatchNorm(3, axis=axis)(x)
    channels = np.moveaxis(y, axis, -1).reshape(-1, 3)
    assert np.isnan(channels[:, 1]).all()
    assert np.isfinite(channels[:, [0, 2]]).all()


def _eval_reference(layer, x):
    """The float64 eval answer with the layer's stored statistics, rounded once."""
    shape = [1] * x.ndim
    shape[layer.axis % x.ndim] = layer.num_features
    mean, var, w, b = (a.astype(np.float64).reshape(shape) for a in (
        layer.running_mean, layer.running_var, layer.weight, layer.bias))
    with np.errstate(over="ignore"):
        y = (x.astype(np.float64) - mean) / np.sqrt(var + layer.eps) * w + b
        if layer.activation == "relu":
            y = np.maximum(y, 0)
        return y.astype(x.dtype)


def _check_channels(y, expected, axis, wide):
    """Channels recomputed in float64 (wide) give the reference's bits; the others the
    kernel's float arithmetic, within the float tolerance."""
    for c in range(y.shape[axis]):
        got, want = np.take(y, c, axis=axis), np.take(expected, c, axis=axis)
        if c in wide:
            assert bitwise_equal(got, want), c
        else:
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-3 if
                                       y.dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_eval_after_training_near_float32s_range(axis, activation):
    """Training on +-3.4e38 stores running_var = inf (documented); eval on the same data
    gives the bias there, not NaN (x - mean overflowed float32 and met a zero scale)."""
    layer = cpubn.BatchNorm(2, axis=axis, activation=activation)
    data = np.array([[3.4e38, 1.0], [-3.4e38, 2.0], [3.4e38, 3.0]], np.float32)
    x = data if axis == -1 else np.ascontiguousarray(data[:, :, None])
    layer(x)
    assert np.isinf(layer.running_var[0])
    layer.bias[...] = [0.5, -0.25]
    y = layer.eval()(x)
    assert np.isfinite(y).all()
    _check_channels(y, _eval_reference(layer, x), axis, wide=[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_eval_with_a_huge_mean_gives_the_float64_answer(dtype):
    """mean -1e36, var 4, x = 3.4e38: (x - mean) / 2 = 1.7e38 is finite, though x - mean
    overflows float32."""
    layer = cpubn.BatchNorm(3, axis=-1).eval()
    layer.running_mean[...] = [-1e36, 0.0, 1e36]
    layer.running_var[...] = [4.0, 1.0, 4.0]
    big = 3.4e38 if dtype == np.float32 else 6e4
    x = np.array([[big, 1.0, -big], [1.0, -2.0, 2.0]], np.float32).astype(dtype)
    y = layer(x)
    _check_channels(y, _eval_reference(layer, x), -1, wide=[0, 2])
    if dtype == np.float32:
        assert np.isfinite(y).all()
