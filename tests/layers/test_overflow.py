"""Large finite float32 data and gradients: the sums that float32 would overflow are
exact (cpubn._core.overflow redoes them wider), and a NaN stays in its own channel."""
import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import normal_data

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
