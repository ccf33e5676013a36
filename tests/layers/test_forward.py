"""Forward pass and running statistics of cpubn.BatchNorm against the float64 reference.

The core grid: dtype x layout (ndim 2-5; channels-first, channels-last, a
middle axis) x train/eval x (affine, track_running_stats, momentum) x threads.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cpubn
from bn_testing import (DTYPES, assert_close, bitwise_equal, core_grid, make_x, randomize,
                        shape_for)
from reference import RefBatchNorm

# (affine, track_running_stats, momentum); momentum only matters when tracking.
FLAGS = [(True, True, 0.1), (True, True, None), (True, False, 0.1),
         (False, True, 0.1), (False, True, None), (False, False, 0.1)]



@pytest.mark.parametrize("dtype,ndim,axis,training,flags,n_threads",
                         core_grid(FLAGS, ("affine", "track", "momentum")))
def test_forward_matches_reference(dtype, ndim, axis, training, flags, n_threads, rng):
    affine, track, momentum = flags
    C = 3 if ndim > 2 else 5
    shape = shape_for(ndim, axis, C)
    bn = cpubn.BatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track,
                         axis=axis, dtype=dtype)
    randomize(bn, rng)
    if not training:
        assert bn.eval() is bn
    expected = RefBatchNorm.like(bn)
    with cpubn.threads(n_threads):
        for step in range(3):
            x = make_x(rng, shape, dtype, axis)
            x_before = x.copy()
            y = bn(x)
            y_ref = expected(x)
            assert type(y) is np.ndarray and y.dtype == dtype and y.shape == shape
            assert_close(y, y_ref, dtype, "value", f"y step {step}")
            assert bitwise_equal(x, x_before), "input was modified"
            if track:
                assert bn.num_batches_tracked == expected.num_batches_tracked
                assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
                assert_close(bn.running_mean, expected.running_mean, dtype, "stat", "running_mean")
                assert_close(bn.running_var, expected.running_var, dtype, "stat", "running_var")
            else:
                assert bn.running_mean is None and bn.running_var is None
                assert bn.num_batches_tracked is None


@pytest.mark.parametrize("module_dtype,x_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mixed_dtypes(module_dtype, x_dtype, training, rng):
    """Parameters stay in the object's dtype; the output takes the input's dtype."""
    bn = randomize(cpubn.BatchNorm(4, dtype=module_dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    for _ in range(2):
        x = make_x(rng, (5, 4, 3), x_dtype)
        y = bn(x)
        assert y.dtype == x_dtype
        assert_close(y, expected(x), x_dtype, "value")
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert getattr(bn, name).dtype == module_dtype, name
        # The running stats are stored in float32 when either side is float32.
        stat_dtype = np.float32 if np.float32 in (module_dtype, x_dtype) else np.float64
        assert_close(bn.running_mean, expected.running_mean, stat_dtype, "stat")
        assert_close(bn.running_var, expected.running_var, stat_dtype, "stat")


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_forward_eps_used(eps, rng):
    bn = cpubn.BatchNorm(3, eps=eps, dtype=np.float64)
    x = make_x(rng, (4, 3, 5), np.float64, spread=(0.05, 0.2))
    assert_close(bn(x), RefBatchNorm.like(bn)(x), np.float64)
    bn.eval()
    assert_close(bn(x), RefBatchNorm.like(bn)(x), np.float64)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.25])
def test_momentum_edges(momentum, rng):
    """momentum 0 keeps the running stats, 1 replaces them by the batch stats."""
    bn = randomize(cpubn.BatchNorm(3, momentum=momentum, dtype=np.float64), rng)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    x = make_x(rng, (6, 3, 2), np.float64)
    bn(x)
    mean = x.mean(axis=(0, 2))
    var_unbiased = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(bn.running_mean, (1 - momentum) * rm0 + momentum * mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.running_var, (1 - momentum) * rv0 + momentum * var_unbiased, rtol=1e-12)
    assert bn.num_batches_tracked == 1


def test_call_is_forward(rng):
    bn = randomize(cpubn.BatchNorm(3, track_running_stats=False), rng)
    x = make_x(rng, (4, 3, 2, 2), np.float32)
    assert bitwise_equal(bn(x), bn.forward(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [1, -1])
def test_forward_out_buffer(dtype, axis, rng):
    shape = shape_for(4, axis, 3)
    bn = randomize(cpubn.BatchNorm(3, axis=axis, dtype=dtype), rng)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, shape, dtype, axis)
    out = np.full(shape, np.nan, dtype=dtype)
    y = bn.forward(x, out=out)
    assert y is out
    assert_close(out, expected(x), dtype)
    assert_close(bn.running_var, expected.running_var, dtype, "stat")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_in_place(dtype, training, rng):
    """out=x is allowed for the forward: x is overwritten by y."""
    bn = randomize(cpubn.BatchNorm(3, dtype=dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, (4, 3, 5), dtype)
    y_ref = expected(x)
    y = bn.forward(x, out=x)
    assert y is x
    assert_close(x, y_ref, dtype)
    assert_close(bn.running_mean, expected.running_mean, dtype, "stat")
    assert_close(bn.running_var, expected.running_var, dtype, "stat")


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_forward_random_shapes(data):
    ndim = data.draw(st.integers(2, 5), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim), label="shape"))
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    training = data.draw(st.booleans(), label="training")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    C = shape[axis]
    if training and np.prod(shape) // C < 2:
        shape = tuple(s if i == axis % ndim else s + 1 for i, s in enumerate(shape))
    rng = np.random.default_rng(seed)
    bn = randomize(cpubn.BatchNorm(C, axis=axis, dtype=dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, shape, dtype, axis)
    assert_close(bn(x), expected(x), dtype)
    assert_close(bn.running_var, expected.running_var, dtype, "stat")
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(bn.backward(dy), expected.backward(dy), dtype, "grad")
    assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad")
    assert_close(bn.grad_bias, expected.grad_bias, dtype, "grad")
