"""GhostBatchNorm against an independent float64 reference of Ghost Batch Normalization
(Hoffer, Hubara & Soudry, 2017), BatchNorm equalities, finite differences, arguments and
state."""
import numpy as np
import pytest

import cpubn
from bn_testing import (DTYPES, assert_close, assert_same_state, bitwise_equal, make_x,
                        numeric_grad, shape_for, snapshot)
from reference import backward, batch_stats, invstd_of, normalize

LAYOUTS = [(2, 1), (2, -1), (3, 2), (4, 1), (4, -1)]


# ---------------------------------------------------------------- the oracle
class RefGhost:
    """Each chunk x[s:s+size] normalized with its own statistics (reference.py's plain
    BatchNorm formulas); one running update per call from the size-weighted means of the
    chunks' means and unbiased variances.  State stored rounded to `dtype`."""

    def __init__(self, size, dtype, weight, bias, running_mean, running_var, eps=1e-5,
                 momentum=0.1, axis=1):
        as_stored = lambda v: None if v is None else np.asarray(v, dtype).astype(np.float64)
        self.weight, self.bias = as_stored(weight), as_stored(bias)
        self.running_mean, self.running_var = as_stored(running_mean), as_stored(running_var)
        self.size, self.dtype, self.eps, self.momentum, self.axis = (size, dtype, eps,
                                                                     momentum, axis)

    def chunks(self, n):
        return [(s, min(n, s + self.size)) for s in range(0, n, self.size)]

    def forward(self, x):
        y = np.empty(x.shape)
        self.saved, means, unbiased, counts = [], [], [], []
        for s, t in self.chunks(len(x)):
            mean, var, m = batch_stats(x[s:t], self.axis)
            invstd = invstd_of(var, self.eps)
            y[s:t] = normalize(x[s:t], mean, invstd, self.weight, self.bias, self.axis)
            self.saved.append((s, t, np.asarray(x[s:t], np.float64), mean, invstd))
            means.append(mean)
            unbiased.append(var * m / (m - 1))
            counts.append(m)
        fractions = np.array(counts, dtype=np.float64)[:, None] / sum(counts)
        ghost_mean = (fractions * np.array(means)).sum(axis=0)
        ghost_var = (fractions * np.array(unbiased)).sum(axis=0)
        f = self.momentum
        self.running_mean = ((1 - f) * self.running_mean + f * ghost_mean).astype(
            self.dtype).astype(np.float64)
        self.running_var = ((1 - f) * self.running_var + f * ghost_var).astype(
            self.dtype).astype(np.float64)
        return y

    def backward(self, dy):
        dx = np.empty(dy.shape)
        dw = db = 0.0
        for s, t, x, mean, invstd in self.saved:
            dx[s:t], w, b = backward(dy[s:t], x, mean, invstd, self.weight, True, self.axis)
            dw, db = dw + w, db + b
        return dx, dw, db


def ghost_pair(rng, C, size, dtype, axis, affine=True, **kwargs):
    layer = cpubn.GhostBatchNorm(C, size, affine=affine, axis=axis, dtype=dtype, **kwargs)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.uniform(-1, 1, C)
    layer.running_mean[...] = rng.uniform(-1, 1, C)
    layer.running_var[...] = rng.uniform(0.5, 2, C)
    ref = RefGhost(size, dtype, layer.weight, layer.bias, layer.running_mean,
                   layer.running_var, axis=axis)
    return layer, ref


def ghost_data(rng, shape, dtype, axis):
    """make_x data with every sample shifted differently: chunk statistics then differ
    from the batch's (a test that ignored the chunks would fail)."""
    x = make_x(rng, shape, np.float64, axis)
    shift = rng.uniform(-2, 2, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    return (x + shift).astype(dtype)


# ---------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ndim,axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("size", [3, 4])
def test_training_steps_match_reference(dtype, ndim, axis, affine, size, rng):
    C, n = 5, 10                           # chunks of 3,3,3,1x(values>1) or 4,4,2
    layer, ref = ghost_pair(rng, C, size, dtype, axis, affine)
    for step in range(3):
        x = ghost_data(rng, shape_for(ndim, axis, C, sizes=(n, 3, 2, 3)), dtype, axis)
        if ndim == 2 and size == 3:
            x = x[:9]                      # (N, C) rows: a last chunk of 1 row is an error
        dy = rng.standard_normal(x.shape).astype(dtype)
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close(y, ref.forward(x), dtype, "value", f"y step {step}")
        assert_close(layer.running_mean, ref.running_mean, dtype, "stat", "running_mean")
        assert_close(layer.running_var, ref.running_var, dtype, "stat", "running_var")
        assert layer.num_batches_tracked == step + 1
        layer.zero_grad()
        dx = layer.backward(dy)
        dx_ref, dw_ref, db_ref = ref.backward(dy)
        assert_close(dx, dx_ref, dtype, "grad", "dx")
        if affine:
            assert_close(layer.grad_weight, dw_ref, dtype, "grad", "grad_weight")
            assert_close(layer.grad_bias, db_ref, dtype, "grad", "grad_bias")


@pytest.mark.parametrize("order", ["F", "nhwc-strided"])
def test_other_memory_orders(order, rng):
    layer, ref = ghost_pair(rng, 4, 3, np.float64, 1)
    x = ghost_data(rng, (8, 4, 3, 2), np.float64, 1)
    x = np.asfortranarray(x) if order == "F" else \
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = np.asfortranarray(rng.standard_normal(x.shape))
    assert_close(layer(x), ref.forward(x), np.float64)
    assert_close(layer.backward(dy), ref.backward(dy)[0], np.float64, "grad")


@pytest.mark.parametrize("axis", [1, -1])
def test_fused_residual_and_relu(axis, rng):
    layer, ref = ghost_pair(rng, 4, 3, np.float64, axis, activation="relu")
    x = ghost_data(rng, shape_for(3, axis, 4, sizes=(7, 3, 3)), np.float64, axis)
    residual = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    y_ref = np.maximum(ref.forward(x) + residual, 0)
    assert_close(layer(x, residual=residual), y_ref, np.float64)
    dx, dresidual = layer.backward(dy)
    masked = np.where(y_ref > 0, dy, 0)
    dx_ref, dw_ref, _ = ref.backward(masked)
    assert_close(dx, dx_ref, np.float64, "grad", "dx")
    assert_close(dresidual, masked, np.float64, "grad", "dresidual")
    assert_close(layer.grad_weight, dw_ref, np.float64, "grad", "grad_weight")


@pytest.mark.parametrize("in_place", [False, True])
def test_out_argument(in_place, rng):
    layer, ref = ghost_pair(rng, 3, 2, np.float32, 1)
    x = ghost_data(rng, (5, 3, 4), np.float32, 1)
    y_ref = ref.forward(x)
    out = x if in_place else np.empty_like(x)
    assert layer(x, out=out) is out
    assert_close(out, y_ref, np.float32)
    if in_place:
        with pytest.raises(ValueError, match="in-place"):
            layer.backward(np.ones_like(x))
    else:
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dx_ref = ref.backward(dy)[0]
        assert layer.backward(dy, out=dy) is dy                # dx written over dy
        assert_close(dy, dx_ref, np.float32, "grad")


# ---------------------------------------------------------------- equalities
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("size", [6, 7, 100])
def test_ghost_batch_at_least_n_is_batchnorm(dtype, axis, size, rng):
    ghost = cpubn.GhostBatchNorm(4, size, axis=axis, dtype=dtype)
    bn = cpubn.BatchNorm(4, axis=axis, dtype=dtype)
    for _ in range(3):
        x = ghost_data(rng, shape_for(4, axis, 4, sizes=(6, 4, 3, 2)), dtype, axis)
        dy = rng.standard_normal(x.shape).astype(dtype)
        assert bitwise_equal(ghost(x), bn(x))
        assert bitwise_equal(ghost.running_mean, bn.running_mean)
        assert bitwise_equal(ghost.running_var, bn.running_var)
        assert bitwise_equal(ghost.backward(dy), bn.backward(dy))
        assert bitwise_equal(ghost.grad_weight, bn.grad_weight)


def test_eval_mode_is_batchnorm_eval(rng):
    ghost, bn = cpubn.GhostBatchNorm(3, 2, dtype=np.float64), cpubn.BatchNorm(3, dtype=np.float64)
    for layer in (ghost, bn):
        layer.running_mean[...] = [1, 2, 3]
        layer.running_var[...] = [0.5, 1, 2]
        layer.eval()
    x = ghost_data(rng, (8, 3, 2), np.float64, 1)
    assert bitwise_equal(ghost(x), bn(x))
    assert bitwise_equal(ghost.backward(x), bn.backward(x))
    # Without running statistics, eval mode is BatchNorm's too: the whole batch's.
    ghost = cpubn.GhostBatchNorm(3, 2, dtype=np.float64, track_running_stats=False).eval()
    bn = cpubn.BatchNorm(3, dtype=np.float64, track_running_stats=False).eval()
    assert bitwise_equal(ghost(x), bn(x))


def test_each_chunk_is_normalized_alone(rng):
    layer = cpubn.GhostBatchNorm(2, 4, affine=False, dtype=np.float64)
    y = layer(ghost_data(rng, (10, 2, 3), np.float64, 1))
    for s, t in ((0, 4), (4, 8), (8, 10)):
        np.testing.assert_allclose(y[s:t].mean(axis=(0, 2)), 0, atol=1e-12)
        np.testing.assert_allclose(y[s:t].var(axis=(0, 2)), 1, rtol=1e-4)


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("axis", [1, -1])
def test_gradients_finite_differences(axis, rng):
    layer, _ = ghost_pair(rng, 3, 2, np.float64, axis)
    x = ghost_data(rng, shape_for(3, axis, 3, sizes=(5, 3, 2)), np.float64, axis)
    g = rng.standard_normal(x.shape)

    def loss():
        state = layer.state_dict()
        value = float(np.sum(layer(x) * g))
        layer.load_state_dict(state)
        return value

    expected = {name: numeric_grad(loss, a)
                for name, a in (("x", x), ("weight", layer.weight), ("bias", layer.bias))}
    layer(x)
    np.testing.assert_allclose(layer.backward(g), expected["x"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_weight, expected["weight"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_bias, expected["bias"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- arguments and state
@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), (2.5, TypeError),
                                         (True, TypeError), ("4", TypeError),
                                         (None, TypeError)])
def test_bad_ghost_batch_size(value, error):
    with pytest.raises(error, match="ghost_batch_size"):
        cpubn.GhostBatchNorm(3, value)
    layer = cpubn.GhostBatchNorm(3, 4)
    with pytest.raises(error, match="ghost_batch_size"):
        layer.ghost_batch_size = value
    assert layer.ghost_batch_size == 4
    layer.ghost_batch_size = np.int64(8)
    assert layer.ghost_batch_size == 8 and type(layer.ghost_batch_size) is int


def test_feature_axis_zero_is_refused(rng):
    with pytest.raises(ValueError, match="axis"):
        cpubn.GhostBatchNorm(3, 2, axis=0)
    layer = cpubn.GhostBatchNorm(4, 2, axis=-2)       # axis 0 of 2-d data
    before = snapshot(layer)
    with pytest.raises(ValueError, match="axis"):
        layer(make_x(rng, (4, 3), np.float32, 0))
    assert_same_state(layer, before)


@pytest.mark.parametrize("bad", ["single value chunk", "wrong channels", "dtype", "out"])
def test_failed_call_changes_nothing(bad, rng):
    layer, _ = ghost_pair(rng, 3, 2, np.float32, -1)
    layer(ghost_data(rng, (6, 3), np.float32, -1))
    layer.backward(np.ones((6, 3), np.float32))
    before = snapshot(layer)
    x = ghost_data(rng, (5, 3), np.float32, -1)           # chunks 2, 2, 1
    args = {"single value chunk": (x,),
            "wrong channels": (ghost_data(rng, (6, 4), np.float32, -1),),
            "dtype": (x.astype(np.int64),),
            "out": (x[:4], np.empty((4, 4), np.float32))}[bad]
    match = "more than 1 value per channel" if bad == "single value chunk" else None
    with pytest.raises((ValueError, TypeError), match=match):
        layer(*args)
    assert_same_state(layer, before)
    # The same error as BatchNorm's for one value per channel:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cpubn.BatchNorm(3, axis=-1)(x[4:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_and_save_load_round_trip(dtype, tmp_path, rng):
    layer, _ = ghost_pair(rng, 4, 3, dtype, -1, momentum=0.3, eps=1e-4, activation="relu")
    layer(ghost_data(rng, (8, 4), dtype, -1))
    state = layer.state_dict()
    copy = cpubn.GhostBatchNorm(4, 3, axis=-1, dtype=dtype)
    copy.load_state_dict(state)
    for key, value in state.items():
        assert bitwise_equal(getattr(copy, key), value)
    layer.save(tmp_path / "ghost")
    loaded = cpubn.GhostBatchNorm.load(tmp_path / "ghost.npz")
    assert type(loaded) is cpubn.GhostBatchNorm
    assert (loaded.ghost_batch_size, loaded.momentum, loaded.eps, loaded.activation,
            loaded.dtype) == (3, 0.3, 1e-4, "relu", np.dtype(dtype))
    assert repr(loaded) == repr(layer) and "ghost_batch_size=3" in repr(layer)
    x = ghost_data(rng, (8, 4), dtype, -1)
    assert bitwise_equal(loaded(x), layer(x))
    assert bitwise_equal(loaded.running_var, layer.running_var)


@pytest.mark.parametrize("axis", [1, -1])
def test_half_precision_input(axis, rng):
    layer, ref = ghost_pair(rng, 4, 3, np.float32, axis)
    x = ghost_data(rng, shape_for(3, axis, 4, sizes=(8, 4, 5)), np.float32, axis)
    x16 = x.astype(np.float16)
    y = layer(x16)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref.forward(x16), rtol=2e-3, atol=4e-3)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    dx = layer.backward(dy)
    assert dx.dtype == np.float16
    np.testing.assert_allclose(dx.astype(np.float64), ref.backward(dy)[0], rtol=5e-3,
                               atol=1e-2)
