"""Hostile data and shapes: large offsets, constant channels, NaN/Inf, odd channel
counts, degenerate sizes, huge channels, odd memory layouts, inputs never mutated."""

import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import assert_close, bitwise_equal, make_params, make_x, randomize
from reference import RefBatchNorm


def to_layout(x_nchw, layout):
    """(N, C, ...) data and its feature axis in the requested layout."""
    if layout == "channels_first":
        return np.ascontiguousarray(x_nchw), 1
    return np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1)), -1


# ------------------------------------------------------------------ offset 1e4

def offset_batch(rng, shape=(32, 6, 24, 24)):
    """float32 unit-variance channels shifted by up to 1e4."""
    offsets = np.array([1e4, -1e4, 9999.37, -4321.5, 1000.0, 0.0])[: shape[1]]
    x = rng.standard_normal(shape) + offsets.reshape(1, -1, 1, 1)
    return x.astype(np.float32)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_offset_1e4_train(layout, n_threads, rng):
    x, axis = to_layout(offset_batch(rng), layout)
    bn = cpubn.BatchNorm(6, axis=axis)
    with cpubn.threads(n_threads):
        y = bn(x)
    mean, var, _ = ref.batch_stats(x, axis)
    y_ref = ref.normalize(x, mean, ref.invstd_of(var, 1e-5), axis=axis)
    err = np.abs(y.astype(np.float64) - y_ref).max()
    assert err <= 1e-5, f"max abs error {err:.3g} at offset 1e4 ({layout})"
    # The running mean carries the offset to float32 precision.
    assert_close(bn.running_mean, 0.1 * mean, np.float32, "stat")


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_offset_1e4_eval(layout, rng):
    """Eval subtracts the (float32) running mean before scaling: still exact."""
    x, axis = to_layout(offset_batch(rng, (8, 6, 16, 16)), layout)
    bn = cpubn.BatchNorm(6, axis=axis).eval()
    mean, var, _ = ref.batch_stats(x, axis)
    bn.running_mean[...] = mean
    bn.running_var[...] = var
    y = bn(x)
    y_ref = ref.normalize(x, bn.running_mean, ref.invstd_of(bn.running_var, 1e-5), axis=axis)
    err = np.abs(y.astype(np.float64) - y_ref).max()
    assert err <= 1e-5, f"max abs error {err:.3g} at offset 1e4 ({layout}, eval)"


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_offset_1e4_functional_and_backward(layout, rng):
    x, axis = to_layout(offset_batch(rng, (16, 6, 16, 16)), layout)
    y, save_mean, save_invstd = cpubn.batch_norm_forward(x, training=True, axis=axis)
    mean, var, _ = ref.batch_stats(x, axis)
    assert np.abs(y.astype(np.float64) - ref.normalize(x, mean, ref.invstd_of(var, 1e-5), axis=axis)).max() <= 1e-5
    # The saved float64 mean keeps the digits a float32 mean would lose (a float32 mean of
    # a channel at 1e4 is off by ~1e-3): cpubn's float32 statistics sum groups of 8 values
    # per lane in float before accumulating in double, so the mean is exact to ~1e-12
    # relative plus a few 1e-9 of the channel's spread.
    spread = np.sqrt(var)
    assert np.all(np.abs(save_mean - mean) <= 1e-12 * np.abs(mean) + 1e-8 * spread), \
        (save_mean - mean) / spread
    np.testing.assert_allclose(save_invstd, ref.invstd_of(var, 1e-5), rtol=1e-7)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw, db = cpubn.batch_norm_backward(dy, x, save_mean, save_invstd, training=True, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, ref.invstd_of(var, 1e-5), training=True, axis=axis)
    assert_close(dx, dx_ref, np.float32, "grad", "dx")
    assert_close(dw, dw_ref, np.float32, "grad", "dweight")
    assert_close(db, db_ref, np.float32, "grad", "dbias")


# ------------------------------------------------------------------ constant channels

@pytest.mark.parametrize("value", [3.7, 0.0, 10000.5, -1e-3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_constant_channel_gives_beta(dtype, layout, value, rng):
    x = make_x(rng, (6, 4, 5, 5), dtype)
    x[:, 2] = value
    x, axis = to_layout(x, layout)
    bn = randomize(cpubn.BatchNorm(4, axis=axis, dtype=dtype), rng)
    expected = RefBatchNorm.like(bn)
    y = bn(x)
    assert np.all(np.isfinite(y))
    channel = np.take(y, 2, axis=axis)
    assert np.all(channel == bn.bias[2]), f"constant channel gave {np.unique(channel)[:5]}, beta={bn.bias[2]}"
    assert_close(y, expected(x), dtype)
    assert_close(bn.running_var, expected.running_var, dtype, "stat")
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = bn.backward(dy)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(bn.grad_weight))
    assert_close(dx, expected.backward(dy), dtype, "grad")
    assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad")


def test_all_zero_input(rng):
    bn = randomize(cpubn.BatchNorm(3), rng)
    y = bn(np.zeros((4, 3, 2), dtype=np.float32))
    assert np.all(y == bn.bias.reshape(1, 3, 1))


# ------------------------------------------------------------------ NaN / Inf

def assert_same_nonfinite(got, expected, dtype, kind="value"):
    got = np.asarray(got, dtype=np.float64)
    for test in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(test(got), test(expected)), test.__name__
    fin = np.isfinite(expected)
    assert_close(got[fin], expected[fin], dtype, kind)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_nan_inf_propagate(layout, training, bad, rng):
    x = make_x(rng, (4, 3, 3, 3), np.float32)
    x[1, 0, 2, 1] = bad
    x, axis = to_layout(x, layout)
    bn = randomize(cpubn.BatchNorm(3, axis=axis), rng).train(training)
    expected = RefBatchNorm.like(bn)
    with np.errstate(all="ignore"):
        y_ref = expected(x)
        y = bn(x)
        assert_same_nonfinite(y, y_ref, np.float32)
        # Other channels are untouched by the bad value.
        assert np.all(np.isfinite(np.take(y, [1, 2], axis=axis)))
        assert_same_nonfinite(bn.running_mean, expected.running_mean, np.float32, "stat")
        assert_same_nonfinite(bn.running_var, expected.running_var, np.float32, "stat")
        dy = rng.standard_normal(x.shape).astype(np.float32)
        assert_same_nonfinite(bn.backward(dy), expected.backward(dy), np.float32, "grad")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_in_dy(training, rng):
    x = make_x(rng, (4, 3, 5), np.float64)
    bn = randomize(cpubn.BatchNorm(3, dtype=np.float64), rng).train(training)
    expected = RefBatchNorm.like(bn)
    bn(x)
    expected(x)
    dy = rng.standard_normal(x.shape)
    dy[2, 1, 3] = np.nan
    with np.errstate(all="ignore"):
        assert_same_nonfinite(bn.backward(dy), expected.backward(dy), np.float64, "grad")
        assert_same_nonfinite(bn.grad_bias, expected.grad_bias, np.float64, "grad")


# ------------------------------------------------------------------ odd shapes

ODD_SHAPES = [
    ((5, 1, 4, 4), 1), ((5, 4, 4, 1), -1),          # C = 1
    ((4, 3, 7, 5), 1), ((4, 7, 5, 3), -1),          # C = 3
    ((3, 17, 6), 1), ((3, 6, 17), -1),              # C = 17, not a multiple of the vector width
    ((2, 33, 5, 3), 1), ((2, 5, 3, 33), -1),        # C = 33
    ((1, 4, 8, 8), 1), ((1, 8, 8, 4), -1),          # N = 1, S > 1
    ((7, 5), 1), ((7, 5), -1), ((6, 5, 1, 1), 1), ((6, 1, 1, 5), -1),  # S = 1
    ((2, 3, 1), 1), ((2, 1, 3), -1),                # two values per channel
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", ODD_SHAPES)
def test_odd_shapes(shape, axis, dtype, training, rng):
    C = shape[axis]
    bn = randomize(cpubn.BatchNorm(C, axis=axis, dtype=dtype), rng).train(training)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, shape, dtype, axis)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(bn(x), expected(x), dtype)
    assert_close(bn.running_mean, expected.running_mean, dtype, "stat")
    assert_close(bn.running_var, expected.running_var, dtype, "stat")
    assert_close(bn.backward(dy), expected.backward(dy), dtype, "grad")
    assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad")
    assert_close(bn.grad_bias, expected.grad_bias, dtype, "grad")


@pytest.mark.parametrize("shape,axis", [((4, 2, 500, 500), 1), ((4, 500, 500, 2), -1)],
                         ids=["channels_first", "channels_last"])
def test_channel_with_a_million_elements(shape, axis, rng):
    """10^6 elements per channel, offset 100: float32 data accumulated wide."""
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 100).astype(np.float32)
    bn = cpubn.BatchNorm(2, axis=axis)
    bn.weight[...] = [1.5, 0.5]
    bn.bias[...] = [0.25, -0.25]
    y = bn(x)
    mean, var, M = ref.batch_stats(x, axis)
    assert M == 10**6
    invstd = ref.invstd_of(var, 1e-5)
    y_ref = ref.normalize(x, mean, invstd, bn.weight, bn.bias, axis)
    assert np.abs(y - y_ref).max() <= 1e-5
    del y, y_ref
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var * M / (M - 1), rtol=1e-6)
    dy = rng.standard_normal(shape, dtype=np.float32)
    dx = bn.backward(dy)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, bn.weight, True, axis)
    assert_close(dx, dx_ref, np.float32, "grad", "dx")
    # Sums of 10^6 terms accumulated wide: little more than the final rounding to float32
    # remains (a float32 running sum would be off by ~1e-7 * 10^6 terms).
    atol = 1e-9 * np.abs(dy.astype(np.float64)).sum()
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(bn.grad_weight, dw_ref, rtol=1e-6, atol=atol)


# ------------------------------------------------------------------ memory layouts

def variants(x):
    """Differently laid out arrays holding the same values as ``x`` (shape may differ)."""
    ro = x.copy()
    ro.flags.writeable = False
    wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    wide[..., ::2] = x
    rev = np.ascontiguousarray(x[::-1])[::-1]
    return {
        "fortran": np.asfortranarray(x),
        "strided": wide[..., ::2],
        "reversed": rev,
        "read_only": ro,
        "transposed_view": np.ascontiguousarray(np.swapaxes(x, 0, -1)).swapaxes(0, -1),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["fortran", "strided", "reversed", "read_only", "transposed_view"])
@pytest.mark.parametrize("axis", [1, -1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_memory_layouts(dtype, axis, kind, training, rng):
    shape = (5, 4, 6, 3)
    C = shape[axis]
    x_c = make_x(rng, shape, dtype, axis)
    dy_c = rng.standard_normal(shape).astype(dtype)
    x = variants(x_c)[kind]
    dy = variants(dy_c)[kind]
    assert np.array_equal(x, x_c) and np.array_equal(dy, dy_c)
    x_before, dy_before = x.copy(order="K"), dy.copy(order="K")
    w, b, rm, rv = make_params(rng, C, dtype)

    def run(xv, dyv):
        bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype).train(training)
        bn.weight[...], bn.bias[...], bn.running_mean[...], bn.running_var[...] = w, b, rm, rv
        y = bn(xv)
        dx = bn.backward(dyv)
        return y, dx, bn

    y, dx, bn = run(x, dy)
    y_c, dx_c, bn_c = run(x_c, dy_c)
    expected = RefBatchNorm(C, axis=axis, dtype=dtype, weight=w, bias=b, running_mean=rm,
                            running_var=rv)
    expected.training = training
    assert_close(y, expected(x_c), dtype)
    assert_close(dx, expected.backward(dy_c), dtype, "grad")
    # Same results as the contiguous copy (up to a few ulps).
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, y_c, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dx_c, rtol=10 * tol, atol=tol)
    assert_close(bn.running_var, bn_c.running_var, dtype, "stat")
    if kind == "read_only":
        assert bitwise_equal(y, y_c) and bitwise_equal(dx, dx_c)
    # The output keeps the input's memory order.
    assert y.shape == shape and y.dtype == dtype
    if kind == "fortran":
        assert y.flags.f_contiguous, "Fortran-ordered input gave a non-Fortran output"
    elif kind in ("strided", "reversed", "read_only"):
        assert y.flags.c_contiguous, f"{kind} C-like input gave a non-C-ordered output"
    # Inputs are never modified.
    assert bitwise_equal(x, x_before) and bitwise_equal(dy, dy_before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_not_mutated_functional(training, rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    w, b, rm, rv = make_params(rng, 3, np.float32)
    before = [a.copy() for a in (x, w, b)]
    y, mean, invstd = cpubn.batch_norm_forward(x, w, b, None, None, training=True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy0, mean0, invstd0 = dy.copy(), mean.copy(), invstd.copy()
    cpubn.batch_norm_backward(dy, x, mean, invstd, w, training=training)
    for a, b_ in zip(before + [dy0, mean0, invstd0], (x, w, b, dy, mean, invstd)):
        assert bitwise_equal(a, b_)
