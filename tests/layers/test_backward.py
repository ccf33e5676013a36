"""Backward pass: dx, grad_weight, grad_bias against the reference and by finite differences."""

import numpy as np
import pytest

import cpubn
from bn_testing import (DTYPES, assert_close, bitwise_equal, core_grid, make_params, make_x,
                        numeric_grad, randomize, shape_for)
from reference import RefBatchNorm

# (affine, track_running_stats)
FLAGS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("dtype,ndim,axis,training,flags,n_threads",
                         core_grid(FLAGS, ("affine", "track")))
def test_backward_matches_reference(dtype, ndim, axis, training, flags, n_threads, rng):
    affine, track = flags
    C = 3 if ndim > 2 else 5
    shape = shape_for(ndim, axis, C)
    bn = randomize(cpubn.BatchNorm(C, affine=affine, track_running_stats=track, axis=axis,
                                   dtype=dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, shape, dtype, axis)
    dy = rng.standard_normal(shape).astype(dtype)
    x_before, dy_before = x.copy(), dy.copy()
    with cpubn.threads(n_threads):
        bn(x)
        dx = bn.backward(dy)
    expected(x)
    dx_ref = expected.backward(dy)
    assert type(dx) is np.ndarray and dx.dtype == dtype and dx.shape == shape
    assert_close(dx, dx_ref, dtype, "grad", "dx")
    if affine:
        assert bn.grad_weight.dtype == dtype and bn.grad_bias.dtype == dtype
        assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad", "grad_weight")
        assert_close(bn.grad_bias, expected.grad_bias, dtype, "grad", "grad_bias")
    else:
        assert bn.grad_weight is None and bn.grad_bias is None
    assert bitwise_equal(x, x_before) and bitwise_equal(dy, dy_before), "input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_out_buffer(dtype, training, rng):
    bn = randomize(cpubn.BatchNorm(3, dtype=dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, (4, 3, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    bn(x)
    expected(x)
    out = np.full_like(x, np.nan)
    dx = bn.backward(dy, out=out)
    assert dx is out
    assert_close(out, expected.backward(dy), dtype, "grad")


def test_backward_uses_last_forward(rng):
    bn = randomize(cpubn.BatchNorm(3, dtype=np.float64), rng)
    expected = RefBatchNorm.like(bn)
    x1 = make_x(rng, (4, 3, 2), np.float64)
    x2 = make_x(rng, (5, 3, 3), np.float64)
    bn(x1)
    expected(x1)
    bn(x2)
    expected(x2)
    dy = rng.standard_normal(x2.shape)
    assert_close(bn.backward(dy), expected.backward(dy), np.float64, "grad")
    # Backward twice after one forward: same dx, gradients accumulate twice.
    assert_close(bn.backward(dy), expected.backward(dy), np.float64, "grad")
    assert_close(bn.grad_weight, expected.grad_weight, np.float64, "grad")
    assert_close(bn.grad_bias, expected.grad_bias, np.float64, "grad")


def test_backward_after_train_then_eval_switch(rng):
    """Mode is that of the forward whose state is saved, not the current flag."""
    bn = randomize(cpubn.BatchNorm(3, dtype=np.float64), rng)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, (4, 3, 2), np.float64)
    bn(x)
    expected(x)
    bn.eval()
    dy = rng.standard_normal(x.shape)
    assert_close(bn.backward(dy), expected.backward(dy), np.float64, "grad")


# ---------------------------------------------------------------- finite differences

FD_CASES = [((4, 3), 1), ((3, 2, 4), 1), ((2, 2, 3), -1), ((2, 3, 2, 2), 2), ((2, 2, 2, 3), -1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", FD_CASES)
def test_gradients_finite_differences_module(shape, axis, training, rng):
    """bn.backward(w) is the gradient of the random loss sum(bn(x) * w)."""
    C = shape[axis]
    x = make_x(rng, shape, np.float64, axis)
    wl = rng.standard_normal(shape)
    weight, bias, rm, rv = make_params(rng, C)

    def loss():
        # Running statistics fixed (track_running_stats=True in eval, none in training).
        y = cpubn.batch_norm(x, None if training else rm.copy(), None if training else rv.copy(),
                             weight, bias, training=training, axis=axis)
        return float((y * wl).sum())

    bn = cpubn.BatchNorm(C, axis=axis, dtype=np.float64).train(training)
    bn.weight[...] = weight
    bn.bias[...] = bias
    bn.running_mean[...] = rm
    bn.running_var[...] = rv
    bn(x)
    dx = bn.backward(wl)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(bn.grad_weight, numeric_grad(loss, weight), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(bn.grad_bias, numeric_grad(loss, bias), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", FD_CASES[:3])
def test_gradients_finite_differences_functional(shape, axis, training, rng):
    """batch_norm_backward gives the gradient of sum(batch_norm_forward(x)[0] * w)."""
    C = shape[axis]
    x = make_x(rng, shape, np.float64, axis)
    wl = rng.standard_normal(shape)
    weight, bias, rm, rv = make_params(rng, C)

    def loss():
        y, _, _ = cpubn.batch_norm_forward(x, weight, bias, rm.copy(), rv.copy(),
                                           training=training, axis=axis)
        return float((y * wl).sum())

    _, mean, invstd = cpubn.batch_norm_forward(x, weight, bias, rm.copy(), rv.copy(),
                                               training=training, axis=axis)
    dx, dw, db = cpubn.batch_norm_backward(wl, x, mean, invstd, weight, training=training, axis=axis)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numeric_grad(loss, weight), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numeric_grad(loss, bias), rtol=1e-6, atol=1e-8)


def test_gradients_finite_differences_no_running_stats_eval(rng):
    """track_running_stats=False in eval mode uses batch statistics, so the
    gradient flows through them (as in PyTorch)."""
    shape = (3, 2, 4)
    x = make_x(rng, shape, np.float64)
    wl = rng.standard_normal(shape)
    bn = cpubn.BatchNorm(2, track_running_stats=False, dtype=np.float64).eval()

    def loss():
        return float((bn(x) * wl).sum())

    num = numeric_grad(loss, x)
    bn(x)
    np.testing.assert_allclose(bn.backward(wl), num, rtol=1e-6, atol=1e-8)
