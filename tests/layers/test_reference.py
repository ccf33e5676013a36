"""Checks of the oracle itself (tests/reference.py), independent of cpubn.

If the reference were wrong every comparison against it would be meaningless,
so its backward is checked by finite differences of its own forward, and its
forward and running-stat update against hand-computed values.
"""

import numpy as np
import pytest

import reference as ref
from bn_testing import numeric_grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 2, 4), 1), ((2, 3, 2), -1), ((3, 2, 2), 0)])
def test_reference_backward_matches_finite_differences(shape, axis, training):
    rng = np.random.default_rng(0)
    C = shape[axis]
    x = rng.standard_normal(shape) * 1.5 + 0.3
    w = rng.uniform(0.5, 1.5, C)
    b = rng.uniform(-1, 1, C)
    rm, rv = rng.uniform(-1, 1, C), rng.uniform(0.5, 2, C)
    wl = rng.standard_normal(shape)

    def loss():
        y = ref.functional_forward(x, w, b, rm, rv, training=training, axis=axis)[0]
        return float((y * wl).sum())

    _, mean, invstd, _, _ = ref.functional_forward(x, w, b, rm, rv, training=training, axis=axis)
    dx, dw, db = ref.backward(wl, x, mean, invstd, w, training=training, axis=axis)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-8)


def test_reference_forward_by_hand():
    # Channel 0: [1, 3, 5, 7] -> mean 4, biased var 5; channel 1 constant 2.
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [7.0, 2.0]])
    y, mean, invstd, rm, rv = ref.functional_forward(
        x, np.array([2.0, 1.0]), np.array([0.5, -1.0]), np.zeros(2), np.ones(2),
        training=True, momentum=0.5, eps=1e-5)
    np.testing.assert_array_equal(mean, [4.0, 2.0])
    np.testing.assert_allclose(invstd, [1 / np.sqrt(5 + 1e-5), 1 / np.sqrt(1e-5)])
    np.testing.assert_allclose(y[:, 0], (x[:, 0] - 4) / np.sqrt(5 + 1e-5) * 2 + 0.5)
    np.testing.assert_array_equal(y[:, 1], -1.0)
    # Unbiased variance 20/3 for the running update.
    np.testing.assert_allclose(rm, [2.0, 1.0])
    np.testing.assert_allclose(rv, [0.5 + 0.5 * 20 / 3, 0.5])


def test_reference_module_cumulative_average():
    rng = np.random.default_rng(1)
    bn = ref.RefBatchNorm(2, momentum=None, dtype=np.float64)
    xs = [rng.standard_normal((5, 2)) + i for i in range(3)]
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked == 3
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(0) for x in xs], axis=0))
    np.testing.assert_allclose(bn.running_var, np.mean([x.var(0, ddof=1) for x in xs], axis=0))


def test_reference_layouts_agree():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 5))
    y1 = ref.functional_forward(x, training=True, axis=1)[0]
    y_last = ref.functional_forward(np.moveaxis(x, 1, -1), training=True, axis=-1)[0]
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y1, rtol=1e-13, atol=1e-13)
