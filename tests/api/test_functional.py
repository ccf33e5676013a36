"""Functional API: batch_norm, batch_norm_forward, batch_norm_backward."""

import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import DTYPES, assert_close, bitwise_equal, make_params, make_x, shape_for

FUNC_LAYOUTS = [(2, 1), (3, -1), (4, 1), (4, -1), (5, 2)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ndim,axis", FUNC_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm(dtype, ndim, axis, training, affine, rng):
    C = 4
    shape = shape_for(ndim, axis, C)
    x = make_x(rng, shape, dtype, axis)
    w, b, rm, rv = make_params(rng, C, dtype)
    if not affine:
        w = b = None
    inputs = [a.copy() for a in (x, w, b) if a is not None]
    y_ref, _, _, rm_ref, rv_ref = ref.functional_forward(
        x, w, b, rm.copy(), rv.copy(), training, 0.2, 1e-4, axis)
    rm_obj, rv_obj = rm, rv
    y = cpubn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4, axis=axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype)
    # Running statistics updated in place (same objects), only when training.
    assert rm is rm_obj and rv is rv_obj
    assert_close(rm, rm_ref, dtype, "stat")
    assert_close(rv, rv_ref, dtype, "stat")
    for before, now in zip(inputs, [a for a in (x, w, b) if a is not None]):
        assert bitwise_equal(before, now), "input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_training_without_running_stats(dtype, rng):
    x = make_x(rng, (5, 3, 4), dtype)
    y = cpubn.batch_norm(x, None, None, training=True)
    assert_close(y, ref.functional_forward(x, training=True)[0], dtype)


def test_batch_norm_defaults_are_eval(rng):
    """training defaults to False, as in torch.nn.functional.batch_norm."""
    x = make_x(rng, (5, 3, 4), np.float64)
    _, _, rm, rv = make_params(rng, 3)
    rm0, rv0 = rm.copy(), rv.copy()
    y = cpubn.batch_norm(x, rm, rv)
    assert_close(y, ref.functional_forward(x, None, None, rm0, rv0, training=False)[0], np.float64)
    assert bitwise_equal(rm, rm0) and bitwise_equal(rv, rv0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_out(dtype, rng):
    x = make_x(rng, (5, 3, 4), dtype)
    out = np.empty_like(x)
    y = cpubn.batch_norm(x, None, None, training=True, out=out)
    assert y is out
    assert_close(out, ref.functional_forward(x, training=True)[0], dtype)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_in_place(dtype, axis, rng):
    """out=x: the functional forward may overwrite its input."""
    x = make_x(rng, shape_for(4, axis, 3), dtype, axis)
    w, b, rm, rv = make_params(rng, 3, dtype)
    y_ref, _, _, rm_ref, rv_ref = ref.functional_forward(x, w, b, rm.copy(), rv.copy(), True,
                                                         0.1, 1e-5, axis)
    y = cpubn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, out=x)
    assert y is x
    assert_close(x, y_ref, dtype)
    assert_close(rv, rv_ref, dtype, "stat")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ndim,axis", FUNC_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_forward_saved_stats(dtype, ndim, axis, training, rng):
    C = 3
    shape = shape_for(ndim, axis, C)
    x = make_x(rng, shape, dtype, axis)
    w, b, rm, rv = make_params(rng, C, dtype)
    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = ref.functional_forward(
        x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5, axis)
    y, save_mean, save_invstd = cpubn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
    assert_close(y, y_ref, dtype)
    # Running statistics updated in place when training, as batch_norm does.
    assert_close(rm, rm_ref, dtype, "stat")
    assert_close(rv, rv_ref, dtype, "stat")
    for name, got, want in (("save_mean", save_mean, mean_ref), ("save_invstd", save_invstd, invstd_ref)):
        assert got.dtype == np.float64 and got.shape == (C,), name
        # Statistics of float32 data are accumulated wide: near float64 accuracy.
        np.testing.assert_allclose(got, want, rtol=1e-9 if dtype == np.float64 else 1e-6,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("ndim,axis", FUNC_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batch_norm_backward(dtype, ndim, axis, with_weight, training, rng):
    C = 3
    shape = shape_for(ndim, axis, C)
    x = make_x(rng, shape, dtype, axis)
    dy = rng.standard_normal(shape).astype(dtype)
    w, _, rm, rv = make_params(rng, C, dtype)
    if training:
        mean, var, _ = ref.batch_stats(x, axis)
    else:
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    invstd = ref.invstd_of(var, 1e-5)
    weight = w if with_weight else None
    before = [a.copy() for a in (dy, x, mean, invstd, w)]
    dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, weight, training=training, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, weight, training, axis)
    assert dx.dtype == dtype and dx.shape == shape
    assert dw.dtype == dtype and db.dtype == dtype and dw.shape == (C,) and db.shape == (C,)
    assert_close(dx, dx_ref, dtype, "grad", "dx")
    assert_close(dw, dw_ref, dtype, "grad", "dweight")
    assert_close(db, db_ref, dtype, "grad", "dbias")
    for a, b in zip(before, (dy, x, mean, invstd, w)):
        assert bitwise_equal(a, b), "input was modified"


def test_batch_norm_backward_weight_dtype(rng):
    """dweight/dbias come back in the weight's dtype."""
    x = make_x(rng, (4, 3, 2), np.float32)
    mean, var, _ = ref.batch_stats(x)
    w = np.ones(3, dtype=np.float64)
    dx, dw, db = cpubn.batch_norm_backward(np.ones_like(x), x, mean, ref.invstd_of(var, 1e-5), w)
    assert dx.dtype == np.float32 and dw.dtype == np.float64 and db.dtype == np.float64
    np.testing.assert_allclose(db, [8.0, 8.0, 8.0], rtol=1e-12)


def test_batch_norm_backward_out(rng):
    x = make_x(rng, (4, 3, 2), np.float64)
    dy = rng.standard_normal(x.shape)
    mean, var, _ = ref.batch_stats(x)
    invstd = ref.invstd_of(var, 1e-5)
    out = np.empty_like(x)
    dx, _, _ = cpubn.batch_norm_backward(dy, x, mean, invstd, out=out)
    assert dx is out
    assert_close(out, ref.backward(dy, x, mean, invstd)[0], np.float64, "grad")


def test_functional_matches_module(rng):
    """Same numbers through the object and through the functions."""
    x = make_x(rng, (6, 4, 3), np.float64)
    dy = rng.standard_normal(x.shape)
    bn = cpubn.BatchNorm(4, dtype=np.float64)
    w, b, rm, rv = make_params(rng, 4)
    bn.weight[...], bn.bias[...], bn.running_mean[...], bn.running_var[...] = w, b, rm, rv
    y_mod = bn(x)
    dx_mod = bn.backward(dy)
    y, mean, invstd = cpubn.batch_norm_forward(x, w, b, rm, rv, training=True)
    dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, w, training=True)
    assert_close(y, y_mod, np.float64)
    assert_close(dx, dx_mod, np.float64, "grad")
    assert_close(dw, bn.grad_weight, np.float64, "grad")
    assert_close(db, bn.grad_bias, np.float64, "grad")


def test_layout_plans_tell_itemsizes_apart():
    """float32 at byte strides (8, 24) is strided; float64 at the same byte strides is a
    Fortran-ordered (3, 2) array, whose output keeps that order (the plan cache used to
    hand it the float32's plan: a C-ordered output and an extra copy)."""
    buffer = np.arange(12, dtype=np.float32)
    strided = np.lib.stride_tricks.as_strided(buffer, (3, 2), (8, 24))
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(3, 2))
    assert strided.strides == fortran.strides
    for x in (strided, fortran):
        y = cpubn.batch_norm(x, None, None, training=True)
        np.testing.assert_allclose(y, cpubn.batch_norm(np.ascontiguousarray(x), None, None,
                                                       training=True))
    assert y.flags.f_contiguous and not y.flags.c_contiguous
