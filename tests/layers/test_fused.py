"""Fused activation and residual add: y = act(bn(x) + residual), act = ReLU or identity.

Checked against an unfused float64 composition of the reference (tests/reference.py):
normalize, add, ReLU, and for the backward the ReLU mask, then the plain BN backward.
Also: ties at exactly 0, finite differences, bitwise equality with the unfused cpubn
sequence, thread-count determinism, bad input, memory, and PyTorch parity.
"""

import tracemalloc

import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import (DTYPES, assert_close, assert_same_state, bitwise_equal, make_params,
                        make_x, numeric_grad, shape_for, snapshot)

# (ndim, axis): channels-first, channels-last, a middle feature axis.
LAYOUTS = [(2, 1), (2, -1), (3, 1), (3, -1), (4, 1), (4, -1), (4, 2)]
VARIANTS = [("relu", False), ("relu", True), (None, True)]      # (activation, residual)


# ---------------------------------------------------------------------- the fused oracle
def fused_forward_ref(x, weight, bias, running_mean, running_var, training, axis, residual,
                      activation, eps=1e-5):
    """(y, v, mean, invstd) in float64: v = bn(x) + residual, y = act(v)."""
    y, mean, invstd, _, _ = ref.functional_forward(x, weight, bias, running_mean, running_var,
                                                   training=training, eps=eps, axis=axis)
    v = y if residual is None else y + np.asarray(residual, dtype=np.float64)
    return (np.maximum(v, 0.0) if activation == "relu" else v), v, mean, invstd


def relu_mask(v, y_cpubn, activation):
    """Where the gradient passes: v > 0.  Within rounding of 0 the sign is the kernel's
    to decide, so there the mask comes from cpubn's own output."""
    if activation != "relu":
        return np.ones(v.shape)
    near_zero = np.abs(v) <= 1e-4 * max(1.0, float(np.abs(v).max()))
    return np.where(near_zero, np.asarray(y_cpubn) > 0, v > 0).astype(np.float64)


def fused_backward_ref(dy, x, mean, invstd, weight, training, axis, mask):
    """(dx, dweight, dbias, dresidual) in float64 for the mask of the forward."""
    g = np.asarray(dy, dtype=np.float64) * mask
    dx, dweight, dbias = ref.backward(g, x, mean, invstd, weight, training, axis)
    return dx, dweight, dbias, g


def make_case(rng, dtype, ndim, axis, C=3, residual=True):
    shape = shape_for(ndim, axis, C)
    x = make_x(rng, shape, dtype, axis)
    r = rng.standard_normal(shape).astype(dtype) if residual else None
    dy = rng.standard_normal(shape).astype(dtype)
    return shape, x, r, dy


# ---------------------------------------------------------------------- module vs oracle
@pytest.mark.parametrize("activation,use_residual", VARIANTS,
                         ids=["relu", "relu+residual", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ndim,axis", LAYOUTS, ids=[f"ndim{n}-axis{a}" for n, a in LAYOUTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_module_matches_unfused_reference(dtype, ndim, axis, training, affine, activation,
                                          use_residual, rng):
    C = 3 if ndim > 2 else 5
    shape, x, r, dy = make_case(rng, dtype, ndim, axis, C, use_residual)
    w, b, rm, rv = make_params(rng, C, dtype)
    bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype, affine=affine, activation=activation)
    bn.running_mean[...], bn.running_var[...] = rm, rv
    if affine:
        bn.weight[...], bn.bias[...] = w, b
    else:
        w = b = None
    bn.train(training)
    before = [a.copy() for a in (x, dy) + ((r,) if use_residual else ())]

    y = bn(x, residual=r)
    result = bn.backward(dy)

    y_ref, v, mean, invstd = fused_forward_ref(x, w, b, rm, rv, training, axis, r, activation)
    assert type(y) is np.ndarray and y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype, "value", "y")
    if activation == "relu":
        assert (y >= 0).all()
    dx_ref, dw_ref, db_ref, dr_ref = fused_backward_ref(
        dy, x, mean, invstd, w, training, axis, relu_mask(v, y, activation))
    if use_residual:
        dx, dr = result
        assert dr.dtype == dtype and dr.shape == shape
        assert_close(dr, dr_ref, dtype, "grad", "dresidual")
    else:
        dx = result
    assert type(dx) is np.ndarray and dx.dtype == dtype and dx.shape == shape
    assert_close(dx, dx_ref, dtype, "grad", "dx")
    if affine:
        assert_close(bn.grad_weight, dw_ref, dtype, "grad", "grad_weight")
        assert_close(bn.grad_bias, db_ref, dtype, "grad", "grad_bias")
    after = [x, dy] + ([r] if use_residual else [])
    assert all(bitwise_equal(a, b) for a, b in zip(after, before)), "an input was modified"


# Shapes that take every kernel path: channel blocks and the split path of the
# channels-first kernels (long runs split into chunks too), channels-last rows.
PATH_CASES = [
    ((4, 200, 2, 2), 1),        # many channels, short runs: channel blocks
    ((3, 2, 150, 150), 1),      # few channels, runs longer than one chunk: split path
    ((2, 20, 20, 70), -1),      # channels-last rows
    ((3000, 7), 1),             # (N, C) rows
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", PATH_CASES, ids=[f"{s}-axis{a}" for s, a in PATH_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_functional_matches_reference_on_every_path(dtype, shape, axis, training, rng):
    C = shape[axis]
    x = make_x(rng, shape, dtype, axis, loc=20.0)
    r = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = make_params(rng, C, dtype)
    for n_threads in (1, 2):
        with cpubn.threads(n_threads):
            y, mean, invstd = cpubn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training,
                                                       axis=axis, activation="relu", residual=r)
            dx, dw, db, dr = cpubn.batch_norm_backward(dy, x, mean, invstd, w, training, axis,
                                                       activation="relu", y=y, residual=True)
        y_ref, v, mean_ref, invstd_ref = fused_forward_ref(x, w, b, rm, rv, training, axis, r,
                                                           "relu")
        assert_close(y, y_ref, dtype, "value", "y")
        expected = fused_backward_ref(dy, x, mean_ref, invstd_ref, w, training, axis,
                                      relu_mask(v, y, "relu"))
        for got, want, name in zip((dx, dw, db, dr), expected, ("dx", "dw", "db", "dr")):
            assert_close(got, want, dtype, "grad", name)


# ---------------------------------------------------------------------- same bits as unfused
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", PATH_CASES[:3] + [((2, 5, 4, 3), 1)],
                         ids=["blocks", "split", "nhwc", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fused_equals_unfused_cpubn_bitwise(dtype, shape, axis, training, rng):
    """The fusion changes the memory traffic, not the arithmetic: the same bits as cpubn's
    BN, then + residual and np.maximum(., 0), then the BN backward of the masked dy."""
    C = shape[axis]
    x = make_x(rng, shape, dtype, axis, loc=5.0)
    r = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    fused = cpubn.BatchNorm(C, axis=axis, dtype=dtype, activation="relu").train(training)
    plain = cpubn.BatchNorm(C, axis=axis, dtype=dtype).train(training)
    for bn in (fused, plain):
        bn.running_mean[...], bn.running_var[...] = 0.5, 2.0
    y = fused(x, residual=r)
    y_plain = np.maximum(plain(x) + r, 0)
    assert np.array_equal(y, y_plain)
    dx, dr = fused.backward(dy)
    g = np.where(y_plain > 0, dy, 0).astype(dtype)
    assert bitwise_equal(dr, g)
    assert bitwise_equal(dx, plain.backward(g))
    assert bitwise_equal(fused.grad_weight, plain.grad_weight)
    assert bitwise_equal(fused.running_var, plain.running_var)


# ---------------------------------------------------------------------- ties at exactly 0
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_ties_exactly_zero_eval(dtype, axis, rng):
    """Eval with mean 0, var + eps == 1 (exactly) and gamma 1, beta 0: bn(x) is x itself,
    so residual = -x makes bn(x) + residual exactly 0 where chosen: relu(0) = 0 and the
    gradient there is 0, for x and for the residual."""
    eps = 2.0 ** -20
    shape = (6, 4, 5) if axis == 1 else (6, 5, 4)
    x = rng.standard_normal(shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    tie = rng.random(shape) < 0.4
    r[tie] = -x[tie]
    bn = cpubn.BatchNorm(4, eps=eps, axis=axis, dtype=np.float64, activation="relu").eval()
    bn.running_var[...] = 1.0 - eps                 # var + eps == 1.0 exactly
    y64 = x.astype(np.float64) + r
    assert (y64[tie] == 0).all()                    # the construction is exact
    y = bn(x, residual=r)
    assert (y[tie] == 0).all() and not np.signbit(y[tie]).any()
    assert_close(y, np.maximum(y64, 0), dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dr = bn.backward(dy)
    mask = (y64 > 0).astype(np.float64)
    assert (dr[tie] == 0).all() and (dx[tie] == 0).all()
    assert_close(dr, dy * mask, dtype, "grad")
    assert_close(dx, dy * mask, dtype, "grad")       # eval: dx = g * gamma * invstd = g
    # Without a residual: x equal to the running mean gives bn(x) = 0 exactly.
    bn = cpubn.BatchNorm(4, axis=axis, dtype=np.float64, activation="relu").eval()
    bn.running_mean[...] = 0.75
    x2 = x.copy()
    x2[tie] = 0.75
    y2 = bn(x2)
    assert (y2[tie] == 0).all()
    dx2 = bn.backward(dy)
    assert (dx2[tie] == 0).all() and (dx2[~tie & (y2 > 0)] != 0).all()


@pytest.mark.parametrize("shape,axis", [((4, 3, 6, 5), 1), ((4, 6, 5, 3), -1), ((4, 200, 2, 2), 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_ties_exactly_zero_train(dtype, shape, axis, rng):
    """residual = -bn(x) (cpubn's own output, checked against the float64 reference) on
    some elements: their sum is exactly 0 in training mode too, and the reference
    gradient with those elements masked out matches."""
    C = shape[axis]
    x = make_x(rng, shape, dtype, axis)
    w, b, _, _ = make_params(rng, C, dtype)
    bn_plain = cpubn.batch_norm_forward(x, w, b, axis=axis)[0]
    y_ref, mean, invstd, _, _ = ref.functional_forward(x, w, b, axis=axis)
    assert_close(bn_plain, y_ref, dtype)
    tie = rng.random(shape) < 0.3
    r = rng.standard_normal(shape).astype(dtype)
    r[tie] = -bn_plain[tie]
    y, _, _ = cpubn.batch_norm_forward(x, w, b, axis=axis, activation="relu", residual=r)
    assert (y[tie] == 0).all()
    v = y_ref + r
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db, dr = cpubn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                               activation="relu", y=y, residual=True)
    mask = np.where(tie, 0.0, relu_mask(v, y, "relu"))
    expected = fused_backward_ref(dy, x, mean, invstd, w, True, axis, mask)
    assert (dr[tie] == 0).all()
    for got, want, name in zip((dx, dw, db, dr), expected, ("dx", "dw", "db", "dr")):
        assert_close(got, want, dtype, "grad", name)


def test_nan_propagates_and_passes_the_gradient():
    """relu(NaN) = NaN, as np.maximum and torch.relu; the backward mask (y <= 0 ? 0 : dy)
    lets the gradient through at a NaN, as PyTorch's threshold_backward does."""
    x = np.arange(24, dtype=np.float64).reshape(4, 3, 2)
    r = np.zeros_like(x)
    r[1, 1, 1] = np.nan
    bn = cpubn.BatchNorm(3, dtype=np.float64, activation="relu").eval()
    y = bn(x, residual=r)
    assert np.isnan(y[1, 1, 1]) and np.isfinite(np.delete(y.ravel(), 1 * 6 + 1 * 2 + 1)).all()
    dx, dr = bn.backward(np.ones_like(x))
    assert dr[1, 1, 1] == 1.0


# ---------------------------------------------------------------------- finite differences
def _loss(x, r, w, b, weights, training, axis, activation, rm, rv):
    y, *_ = cpubn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis,
                                     activation=activation, residual=r)
    return float((y * weights).sum())


@pytest.mark.parametrize("activation,use_residual", VARIANTS,
                         ids=["relu", "relu+residual", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [1, -1])
def test_finite_differences(axis, training, activation, use_residual, rng):
    shape = (4, 3, 5) if axis == 1 else (4, 5, 3)
    C = 3
    x = make_x(rng, shape, np.float64, axis)
    w, b, rm, rv = make_params(rng, C)
    plain, *_ = ref.functional_forward(x, w, b, rm, rv, training=training, axis=axis)
    # Keep bn(x) + r away from the ReLU's kink so that differences see one side of it.
    offset = rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    r = offset - plain if use_residual else None
    if not use_residual:
        assert np.abs(plain).min() > 1e-3, "unlucky data: an output near the kink"
    weights = rng.standard_normal(shape)
    args = (w, b, weights, training, axis, activation)

    y, mean, invstd = cpubn.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis,
                                               activation=activation, residual=r)
    grads = cpubn.batch_norm_backward(weights, x, mean, invstd, w, training, axis,
                                      activation=activation,
                                      y=y if activation else None, residual=use_residual)
    def loss():
        return _loss(x, r, *args, rm, rv)

    np.testing.assert_allclose(grads[0], numeric_grad(loss, x), rtol=1e-5, atol=1e-7, err_msg="dx")
    np.testing.assert_allclose(grads[1], numeric_grad(loss, w), rtol=1e-5, atol=1e-7, err_msg="dw")
    np.testing.assert_allclose(grads[2], numeric_grad(loss, b), rtol=1e-5, atol=1e-7, err_msg="db")
    if use_residual:
        np.testing.assert_allclose(grads[3], numeric_grad(loss, r), rtol=1e-5, atol=1e-7,
                                   err_msg="dresidual")


# ---------------------------------------------------------------------- threads
THREAD_CASES = [
    ((16, 64, 32, 32), 1, np.float32),      # channel blocks
    ((8, 2, 128, 128), 1, np.float64),      # split path, runs in chunks
    ((16, 32, 32, 64), -1, np.float32),     # channels-last
    ((100_000, 3), -1, np.float64),         # (N, C)
]


@pytest.mark.parametrize("shape,axis,dtype", THREAD_CASES,
                         ids=[f"{s}-axis{a}-{np.dtype(d).name}" for s, a, d in THREAD_CASES])
def test_bitwise_identical_across_thread_counts(shape, axis, dtype, rng):
    C = shape[axis]
    x = make_x(rng, shape, dtype, axis, loc=30.0)
    r = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    w, b, rm, rv = make_params(rng, C, dtype)
    results = {}
    for n in (1, 2, 3):
        with cpubn.threads(n):
            out = {}
            for activation, residual in VARIANTS:
                key = f"{activation}-{residual}"
                bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype, activation=activation)
                bn.weight[...], bn.bias[...] = w, b
                res = r if residual else None
                out[key + "-y_train"] = bn(x, res)
                out[key + "-d_train"] = bn.backward(dy)
                bn.eval()
                out[key + "-y_eval"] = bn(x, res)
                out[key + "-d_eval"] = bn.backward(dy)
                out[key + "-grads"] = (bn.grad_weight.copy(), bn.grad_bias.copy(),
                                       bn.running_mean.copy(), bn.running_var.copy())
            results[n] = out
    for n in (2, 3):
        for key, value in results[1].items():
            value = value if isinstance(value, tuple) else (value,)
            other = results[n][key]
            other = other if isinstance(other, tuple) else (other,)
            assert all(bitwise_equal(a, b) for a, b in zip(value, other)), \
                f"{key} differs between 1 and {n} threads"


# ---------------------------------------------------------------------- API details
def test_backward_returns_dresidual_only_after_a_residual_forward(rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = np.ones_like(x)
    for activation in (None, "relu"):
        bn = cpubn.BatchNorm(3, activation=activation)
        bn(x, residual=r)
        dx, dr = bn.backward(dy)
        assert dx.shape == dr.shape == x.shape and not np.shares_memory(dr, dy)
        bn(x)
        assert isinstance(bn.backward(dy), np.ndarray)
    # activation=None with a residual: dresidual is dy (a copy), dx the plain BN backward.
    bn = cpubn.BatchNorm(3)
    plain = cpubn.BatchNorm(3)
    y = bn(x, residual=r)
    assert np.array_equal(y, plain(x) + r)
    dx, dr = bn.backward(dy)
    assert bitwise_equal(dr, dy) and bitwise_equal(dx, plain.backward(dy))


def test_residual_in_any_memory_order(rng):
    x = make_x(rng, (4, 6, 5, 3), np.float64, axis=1)
    r = rng.standard_normal((4, 6, 5, 3))
    bn = cpubn.BatchNorm(6, dtype=np.float64, activation="relu")
    expected = bn(x, residual=r)
    dy = rng.standard_normal(x.shape)
    dx, dr = bn.backward(dy)
    for other in (np.asfortranarray(r), r.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2),
                  np.repeat(r, 2, axis=3)[..., ::2], r.tolist()):
        bn2 = cpubn.BatchNorm(6, dtype=np.float64, activation="relu")
        assert bitwise_equal(bn2(x, residual=other), expected)
        dx2, dr2 = bn2.backward(dy)
        assert bitwise_equal(dx2, dx) and bitwise_equal(dr2, dr)
    # A channels-last (F-ordered) x: the residual is brought into x's memory order.
    xf = np.asfortranarray(x)
    bn3 = cpubn.BatchNorm(6, dtype=np.float64, activation="relu")
    yf = bn3(xf, residual=r)
    assert yf.flags.f_contiguous
    assert_close(yf, expected, np.float64)


def test_out_and_in_place(rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    reference_bn = cpubn.BatchNorm(3, activation="relu")
    y_ref = reference_bn(x, residual=r)
    dx_ref, dr_ref = reference_bn.backward(dy)
    # out= (same order and another memory order): backward still reads the right mask.
    for out in (np.empty_like(x), np.empty_like(x, order="F")):
        bn = cpubn.BatchNorm(3, activation="relu")
        assert bn(x, residual=r, out=out) is out
        assert bitwise_equal(np.ascontiguousarray(out), y_ref)
        dx, dr = bn.backward(dy)
        assert bitwise_equal(dx, dx_ref) and bitwise_equal(dr, dr_ref)
    # dx written over dy.
    bn = cpubn.BatchNorm(3, activation="relu")
    bn(x, residual=r)
    dy_copy = dy.copy()
    dx, dr = bn.backward(dy_copy, out=dy_copy)
    assert dx is dy_copy and bitwise_equal(dx, dx_ref) and bitwise_equal(dr, dr_ref)
    bn = cpubn.BatchNorm(3, activation="relu")
    bn(x)
    dy_copy = dy.copy()
    dx = bn.backward(dy_copy, out=dy_copy)
    assert dx is dy_copy
    check = cpubn.BatchNorm(3, activation="relu")
    check(x)
    assert bitwise_equal(dx, check.backward(dy))
    # In place (out=x) at inference: works, and backward refuses as for any in-place call.
    bn = cpubn.BatchNorm(3, activation="relu").eval()
    x_copy = x.copy()
    expected = cpubn.BatchNorm(3, activation="relu").eval()(x, residual=r)
    assert bn(x_copy, residual=r, out=x_copy) is x_copy
    assert bitwise_equal(x_copy, expected)
    with pytest.raises(ValueError, match="in-place"):
        bn.backward(dy)


def test_repr_config_save_load(tmp_path, rng):
    bn = cpubn.BatchNorm(4, activation="relu")
    assert repr(bn) == ("BatchNorm(4, eps=1e-05, momentum=0.1, affine=True, "
                        "track_running_stats=True, axis=1, activation='relu')")
    assert repr(cpubn.BatchNorm(4)).endswith("axis=1)")
    x = make_x(rng, (5, 4, 3), np.float32)
    bn(x)
    bn.eval()
    path = tmp_path / "bn.npz"
    bn.save(path)
    loaded = cpubn.BatchNorm.load(path)
    assert loaded.activation == "relu" and repr(loaded) == repr(bn)
    assert bitwise_equal(loaded(x), bn(x))
    lazy = cpubn.LazyBatchNorm(activation="relu")
    assert repr(lazy).endswith("activation='relu')")
    y = lazy(x, residual=-x)
    assert lazy.num_features == 4 and lazy.activation == "relu" and (y >= 0).all()
    assert repr(lazy) == repr(cpubn.BatchNorm(4, activation="relu"))
    lazy.eval().save(tmp_path / "lazy.npz")
    assert cpubn.LazyBatchNorm.load(tmp_path / "lazy.npz").activation == "relu"


def test_functional_batch_norm_fused(rng):
    x = make_x(rng, (6, 3, 4), np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    w, b, rm, rv = make_params(rng, 3, np.float32)
    y = cpubn.batch_norm(x, rm, rv, w, b, activation="relu", residual=r)
    y_ref, *_ = fused_forward_ref(x, w, b, rm, rv, False, 1, r, "relu")
    assert_close(y, y_ref, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y = cpubn.batch_norm(x, rm2, rv2, w, b, training=True, activation="relu")
    y_ref, *_ = fused_forward_ref(x, w, b, rm, rv, True, 1, None, "relu")
    assert_close(y, y_ref, np.float32)
    assert not bitwise_equal(rm2, rm)                   # running statistics updated


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["gelu", "ReLU", "", 1, True, ["relu"]])
def test_invalid_activation(bad):
    with pytest.raises(ValueError, match="activation") as info:
        cpubn.BatchNorm(3, activation=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="activation"):
        cpubn.LazyBatchNorm(activation=bad)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="activation"):
        cpubn.batch_norm_forward(x, activation=bad)
    with pytest.raises(ValueError, match="activation"):
        cpubn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), activation=bad, y=x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_residual_leaves_state_unchanged(training, rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = cpubn.BatchNorm(3, activation="relu").train(training)
    bn.running_mean[...] = 0.3
    y = bn(x, residual=r)               # held: in eval, backward needs it (the ReLU mask)
    good = bn.backward(dy)
    bn.zero_grad()
    y = bn(x, residual=r)                                        # primes the backward again
    snap = snapshot(bn)
    r_before = r.copy()
    buffer = np.zeros(x.size + 1, np.float32)
    shifted = buffer[1:].reshape(x.shape)
    bad_calls = [
        (ValueError, lambda: bn(x, residual=r[:, :, :4]), "shape"),
        (ValueError, lambda: bn(x, residual=r[None]), "shape"),
        (TypeError, lambda: bn(x, residual=r.astype(np.float64)), "float64"),
        (TypeError, lambda: bn(x, residual=r.astype(np.int32)), "int32"),
        (TypeError, lambda: bn(x, residual=r.astype(np.float16)), "float16"),
        (ValueError, lambda: bn(x, residual=r, out=r), "overlap"),
        (ValueError, lambda: bn(x, residual=buffer[:-1].reshape(x.shape), out=shifted),
         "overlap"),
    ]
    for exc, call, match in bad_calls:
        with pytest.raises(exc, match=match):
            call()
        assert_same_state(bn, snap)
        assert bitwise_equal(r, r_before)
    # The last good forward is still what backward differentiates.
    dx, dr = bn.backward(dy)
    assert bitwise_equal(dx, good[0]) and bitwise_equal(dr, good[1])
    # backward's out must not overlap the saved output (the ReLU mask).
    y = bn(x, residual=r)
    with pytest.raises(ValueError, match="overlap"):
        bn.backward(dy, out=y)


def test_functional_bad_input(rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm_before, rv_before = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="shape"):
        cpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, residual=r[:2])
    with pytest.raises(TypeError, match="dtype"):
        cpubn.batch_norm(x, rm, rv, training=True, residual=r.astype(np.float64))
    with pytest.raises(ValueError, match="overlap"):
        cpubn.batch_norm(x, rm, rv, training=True, residual=r, out=r)
    assert bitwise_equal(rm, rm_before) and bitwise_equal(rv, rv_before)
    y, mean, invstd = cpubn.batch_norm_forward(x, activation="relu", residual=r)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match="needs y"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match="only used with activation"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, y=y)
    with pytest.raises(ValueError, match="shape"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y[:2])
    with pytest.raises(TypeError, match="dtype"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu",
                                  y=y.astype(np.float64))
    with pytest.raises(TypeError, match="residual must be True or False"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y, residual=r)
    with pytest.raises(ValueError, match="overlap"):
        cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y, out=y)
    y_before = y.copy()
    dx, dw, db, dr = cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y,
                                               residual=True)
    assert bitwise_equal(y, y_before)
    dx2, dw2, db2 = cpubn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y)
    assert bitwise_equal(dx, dx2) and bitwise_equal(dw, dw2)


# ---------------------------------------------------------------------- memory
def _peak_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("axis", [1, -1])
def test_no_extra_full_size_memory(axis):
    shape = (16, 32, 32, 32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn = cpubn.BatchNorm(shape[axis], axis=axis, activation="relu")
    bn(x, residual=r)                                            # warm the layout cache
    assert _peak_bytes(lambda: bn(x, residual=r)) < x.nbytes * 1.1 + 65536            # y only
    out = np.empty_like(x)
    assert _peak_bytes(lambda: bn(x, residual=r, out=out)) < x.nbytes * 0.1
    assert _peak_bytes(lambda: bn.backward(dy)) < 2 * x.nbytes * 1.05 + 65536  # dx, dr
    bn(x)
    assert _peak_bytes(lambda: bn.backward(dy)) < x.nbytes * 1.1 + 65536     # dx only


# ---------------------------------------------------------------------- PyTorch parity
@pytest.mark.parametrize("activation,use_residual", VARIANTS,
                         ids=["relu", "relu+residual", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_torch_parity(dtype, layout, training, activation, use_residual, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape = (4, 5, 6, 6)
    x = make_x(rng, shape, dtype, 1, loc=3.0)
    r = rng.standard_normal(shape).astype(dtype) if use_residual else None
    dy = rng.standard_normal(shape).astype(dtype)
    w, b, rm, rv = make_params(rng, 5, dtype)

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    bt = torch.from_numpy(b).requires_grad_(True)
    rt = torch.from_numpy(r).requires_grad_(True) if use_residual else None
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    vt = F.batch_norm(xt, rmt, rvt, wt, bt, training=training)
    if use_residual:
        vt = vt + rt
    yt = F.relu(vt) if activation == "relu" else vt
    yt.backward(torch.from_numpy(dy))

    bn = cpubn.BatchNorm(5, axis=1 if layout == "nchw" else -1, dtype=dtype,
                         activation=activation).train(training)
    bn.weight[...], bn.bias[...], bn.running_mean[...], bn.running_var[...] = w, b, rm, rv
    if layout == "nhwc":
        last = (lambda a: None if a is None else np.ascontiguousarray(np.moveaxis(a, 1, -1)))
        first = (lambda a: np.moveaxis(a, -1, 1))
        # Held: an eval-mode forward keeps only weak references for backward.
        x_last = last(x)
        y_last = bn(x_last, residual=last(r))
        y = first(y_last)
        result = bn.backward(last(dy))
        result = tuple(first(a) for a in result) if use_residual else first(result)
    else:
        y = bn(x, residual=r)
        result = bn.backward(dy)
    dx, dr = result if use_residual else (result, None)
    assert_close(y, yt.detach().numpy(), dtype, "value", "y")
    assert_close(dx, xt.grad.numpy(), dtype, "grad", "dx")
    if use_residual:
        assert_close(dr, rt.grad.numpy(), dtype, "grad", "dresidual")
    assert_close(bn.grad_weight, wt.grad.numpy(), dtype, "grad", "grad_weight")
    assert_close(bn.grad_bias, bt.grad.numpy(), dtype, "grad", "grad_bias")
    assert_close(bn.running_mean, rmt.numpy(), dtype, "stat", "running_mean")
    assert_close(bn.running_var, rvt.numpy(), dtype, "stat", "running_var")


# ---------------------------------------------------------------------- neighbours
def test_lazy_bad_residual_leaves_it_unmaterialized(rng):
    lazy = cpubn.LazyBatchNorm(activation="relu")
    x = make_x(rng, (4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="shape"):
        lazy(x, residual=x[:, :2])
    assert lazy.has_uninitialized_params()
    with pytest.raises(TypeError, match="dtype"):
        lazy(x, residual=x.astype(np.float64))
    assert lazy.has_uninitialized_params() and lazy.num_batches_tracked == 0
    assert (lazy(x, residual=x) >= 0).all() and lazy.num_features == 3


def test_folding_a_fused_batchnorm(rng):
    """The affine part folds into the layer before; the ReLU stays after it.  Into the
    layer after, a ReLU in between cannot fold."""
    bn = cpubn.BatchNorm(4, dtype=np.float64, activation="relu")
    bn(make_x(rng, (32, 4), np.float64))
    bn.eval()
    weight, bias = rng.standard_normal((4, 6)), rng.standard_normal(4)
    x = rng.standard_normal((5, 6))
    new_weight, new_bias = cpubn.fold_into_linear(weight, bias, bn)
    np.testing.assert_allclose(np.maximum(x @ new_weight.T + new_bias, 0),
                               bn(x @ weight.T + bias), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        cpubn.fold_into_following_linear(bn, rng.standard_normal((2, 4)), None)


def test_bench_fused_smoke(tmp_path, capsys):
    import json

    from cpubn.bench import cli

    path = tmp_path / "fused.json"
    rc = cli.main(["--fused", "--shape", "4,8,5,5", "--shape", "1,8,3,3", "--repeats", "1",
                      "--threads", "1", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    cases = {(tuple(r["shape"]), r["layout"], r["op"]) for r in report["results"]}
    assert cases == ({((4, 8, 5, 5), layout, op) for layout in ("nchw", "nhwc")
                      for op in ("train", "eval", "backward")}
                     | {((1, 8, 3, 3), layout, "eval") for layout in ("nchw", "nhwc")})
    for r in report["results"]:
        assert not r["errors"], r["errors"]
        assert {"bn", "fused", "fused+res", "unfused", "unfused+res"} <= set(r["median_ms"])
        assert r["ratios"]["fused/bn"] > 0
    out = capsys.readouterr().out
    assert "fused/bn" in out and "median fused/bn" in out
