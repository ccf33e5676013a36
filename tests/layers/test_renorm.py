"""BatchRenorm against an independent float64 reference of Batch Renormalization
(Ioffe, 2017), BatchNorm equalities, finite differences, arguments and state."""
import numpy as np
import pytest

import cpubn
from bn_testing import (DTYPES, assert_close, assert_same_state, bitwise_equal, make_x,
                        numeric_grad, shape_for, snapshot)
from reference import batch_stats, from_rows, to_rows

LAYOUTS = [(2, 1), (2, -1), (3, 2), (4, 1), (4, -1)]


# ---------------------------------------------------------------- the oracle
class RefRenorm:
    """Batch Renormalization in float64, written from the paper's Algorithm 1.  State is
    stored rounded to `dtype` (as the layer under test stores it)."""

    def __init__(self, C, dtype, weight, bias, running_mean, running_var, rmax, dmax,
                 eps=1e-5, momentum=0.1, axis=1):
        as_stored = lambda v: None if v is None else np.asarray(v, dtype).astype(np.float64)
        self.weight, self.bias = as_stored(weight), as_stored(bias)
        self.running_mean, self.running_var = as_stored(running_mean), as_stored(running_var)
        self.dtype, self.rmax, self.dmax, self.eps = dtype, rmax, dmax, eps
        self.momentum, self.axis, self.C, self.tracked = momentum, axis, C, 0

    def forward(self, x):
        rows = to_rows(x, self.axis)
        mean, var, m = batch_stats(x, self.axis)
        sigma_b = np.sqrt(var + self.eps)
        sigma = np.sqrt(self.running_var + self.eps)
        r = np.minimum(np.maximum(sigma_b / sigma, 1 / self.rmax), self.rmax)
        d = np.minimum(np.maximum((mean - self.running_mean) / sigma, -self.dmax), self.dmax)
        xhat = (rows - mean) / sigma_b
        w = np.ones(self.C) if self.weight is None else self.weight
        b = np.zeros(self.C) if self.bias is None else self.bias
        y = w * (xhat * r + d) + b
        self.tracked += 1
        factor = 1.0 / self.tracked if self.momentum is None else self.momentum
        self.running_mean = ((1 - factor) * self.running_mean + factor * mean).astype(
            self.dtype).astype(np.float64)
        self.running_var = ((1 - factor) * self.running_var + factor * var * m / (m - 1)
                            ).astype(self.dtype).astype(np.float64)
        self.saved = (xhat, sigma_b, r, d, w)
        return from_rows(y, np.shape(x), self.axis), r, d

    def backward(self, dy):
        """r and d constant: the gradient of y = w*(xhat*r + d) + b through xhat only."""
        xhat, sigma_b, r, d, w = self.saved
        g = to_rows(dy, self.axis)
        dxhat = g * w * r
        dx = (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0)) / sigma_b
        return (from_rows(dx, np.shape(dy), self.axis), (g * (xhat * r + d)).sum(axis=0),
                g.sum(axis=0))


def renorm_pair(rng, C, dtype, axis, affine=True, rmax=1.5, dmax=0.5, momentum=0.1):
    """A BatchRenorm with random parameters and running statistics, and its oracle."""
    layer = cpubn.BatchRenorm(C, affine=affine, axis=axis, dtype=dtype, rmax=rmax,
                              dmax=dmax, momentum=momentum)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.uniform(-1, 1, C)
    # Running statistics far from the data's for some channels, so that both clipped and
    # unclipped r and d occur.
    layer.running_mean[...] = rng.uniform(-3, 3, C)
    layer.running_var[...] = rng.uniform(0.2, 8, C)
    ref = RefRenorm(C, dtype, layer.weight, layer.bias, layer.running_mean,
                    layer.running_var, rmax, dmax, momentum=momentum, axis=axis)
    return layer, ref


# ---------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ndim,axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_training_steps_match_reference(dtype, ndim, axis, affine, rng):
    C = 7
    layer, ref = renorm_pair(rng, C, dtype, axis, affine)
    clipped_r = clipped_d = free_r = free_d = 0
    for step in range(3):
        x = make_x(rng, shape_for(ndim, axis, C, sizes=(6, 5, 4, 3)), dtype, axis)
        dy = rng.standard_normal(x.shape).astype(dtype)
        y = layer(x)
        y_ref, r, d = ref.forward(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close(y, y_ref, dtype, "value", f"y step {step}")
        assert_close(layer.last_r, r, dtype, "value", "r")
        assert_close(layer.last_d, d, dtype, "value", "d")
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
        clipped_r += np.sum(np.isclose(r, 1.5) | np.isclose(r, 1 / 1.5))
        free_r += np.sum((r > 1 / 1.5 + 1e-9) & (r < 1.5 - 1e-9))
        clipped_d += np.sum(np.isclose(np.abs(d), 0.5))
        free_d += np.sum(np.abs(d) < 0.5 - 1e-9)
    assert min(clipped_r, free_r, clipped_d, free_d) > 0, "the data must exercise both"


@pytest.mark.parametrize("axis", [1, -1])
def test_fused_residual_and_relu_match_reference(axis, rng):
    C = 5
    layer, ref = renorm_pair(rng, C, np.float64, axis)
    layer.activation = "relu"
    x = make_x(rng, shape_for(4, axis, C, sizes=(6, 5, 4, 3)), np.float64, axis)
    residual = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    y, dres = layer(x, residual=residual), None
    y_ref = np.maximum(ref.forward(x)[0] + residual, 0)
    assert_close(y, y_ref, np.float64, "value", "y")
    dx, dres = layer.backward(dy)
    mask = y_ref > 0
    dx_ref, dw_ref, db_ref = ref.backward(np.where(mask, dy, 0))
    assert_close(dx, dx_ref, np.float64, "grad", "dx")
    assert_close(dres, np.where(mask, dy, 0), np.float64, "grad", "dresidual")
    assert_close(layer.grad_weight, dw_ref, np.float64, "grad", "grad_weight")


def test_half_precision_input(rng):
    C = 4
    layer, ref = renorm_pair(rng, C, np.float32, 1)
    x = make_x(rng, (8, C, 5), np.float32, 1).astype(np.float16)
    y = layer(x)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref.forward(x)[0], rtol=2e-3, atol=2e-3)
    assert layer.backward(np.ones_like(y)).dtype == np.float16


def test_momentum_none_is_a_cumulative_average(rng):
    layer, ref = renorm_pair(rng, 3, np.float64, 1, momentum=None)
    for _ in range(3):
        x = make_x(rng, (5, 3, 4), np.float64, 1)
        layer(x)
        ref.forward(x)
    assert_close(layer.running_var, ref.running_var, np.float64, "stat")


@pytest.mark.parametrize("in_place", [False, True])
def test_out_argument(in_place, rng):
    layer, ref = renorm_pair(rng, 3, np.float32, 1)
    x = make_x(rng, (6, 3, 4), np.float32, 1)
    y_ref = ref.forward(x)[0]
    out = x if in_place else np.empty_like(x)
    assert layer(x, out=out) is out
    assert_close(out, y_ref, np.float32)


# ---------------------------------------------------------------- equalities
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", True)])
def test_rmax_1_dmax_0_is_batchnorm(dtype, axis, activation, residual, rng):
    C = 6
    renorm = cpubn.BatchRenorm(C, axis=axis, dtype=dtype, rmax=1, dmax=0,
                               activation=activation)
    bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype, activation=activation)
    for layer in (renorm, bn):
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-1, 1, C)
        layer.running_mean[...] = 3.0          # far from the data: r, d would be clipped
        layer.running_var[...] = 0.1
    for _ in range(3):
        x = make_x(rng, shape_for(4, axis, C, sizes=(5, 4, 3, 3)), dtype, axis)
        dy = rng.standard_normal(x.shape).astype(dtype)
        extra = {"residual": np.ones_like(x)} if residual else {}
        y_renorm, y_bn = renorm(x, **extra), bn(x, **extra)
        assert bitwise_equal(y_renorm, y_bn)
        assert bitwise_equal(renorm.running_mean, bn.running_mean)
        assert bitwise_equal(renorm.running_var, bn.running_var)
        g_renorm, g_bn = renorm.backward(dy), bn.backward(dy)
        if residual:
            g_renorm, g_bn = g_renorm[0], g_bn[0]
        np.testing.assert_allclose(g_renorm, g_bn, rtol=1e-12 if dtype == np.float64 else 1e-6,
                                   atol=1e-12 if dtype == np.float64 else 1e-6)
        np.testing.assert_allclose(renorm.grad_weight, bn.grad_weight, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(renorm.grad_bias, bn.grad_bias, rtol=1e-12, atol=1e-12)


def test_eval_mode_is_batchnorm_eval(rng):
    renorm, bn = cpubn.BatchRenorm(4, dtype=np.float64), cpubn.BatchNorm(4, dtype=np.float64)
    for layer in (renorm, bn):
        layer.running_mean[...] = [0.5, -1, 2, 0]
        layer.running_var[...] = [1, 2, 0.5, 4]
        layer.weight[...] = [1, 2, 3, 4]
        layer.eval()
    x = make_x(rng, (5, 4, 3), np.float64, 1)
    assert bitwise_equal(renorm(x), bn(x))
    dy = rng.standard_normal(x.shape)
    assert bitwise_equal(renorm.backward(dy), bn.backward(dy))
    assert renorm.num_batches_tracked == 0


# ---------------------------------------------------------------- finite differences
def _loss_of(layer, x, g):
    """Sum(y * g) for a training forward that leaves the layer's state as it was."""
    def loss():
        state = layer.state_dict()
        value = float(np.sum(layer(x) * g))
        layer.load_state_dict(state)
        return value
    return loss


@pytest.mark.parametrize("axis", [1, -1])
def test_parameter_gradients_finite_differences(axis, rng):
    # y is linear in weight and bias with r and d independent of them: always defined.
    layer, _ = renorm_pair(rng, 3, np.float64, axis)
    x = make_x(rng, shape_for(3, axis, 3, sizes=(5, 4, 3)), np.float64, axis)
    g = rng.standard_normal(x.shape)
    loss = _loss_of(layer, x, g)
    expected_w, expected_b = numeric_grad(loss, layer.weight), numeric_grad(loss, layer.bias)
    layer(x)
    layer.backward(g)
    np.testing.assert_allclose(layer.grad_weight, expected_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.grad_bias, expected_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [1, -1])
def test_input_gradient_finite_differences_where_r_and_d_are_clipped(axis, rng):
    # With r and d saturated at their limits they do not move with x, so the paper's
    # gradient (r, d constant) is the true gradient and finite differences check it.
    layer = cpubn.BatchRenorm(3, axis=axis, dtype=np.float64, rmax=1.2, dmax=0.3)
    layer.weight[...] = [0.7, 1.3, -0.9]
    layer.running_mean[...] = [8, -8, 8]        # |d| far above dmax
    layer.running_var[...] = [100, 0.001, 100]  # r far outside [1/rmax, rmax]
    x = make_x(rng, shape_for(3, axis, 3, sizes=(4, 3, 3)), np.float64, axis)
    g = rng.standard_normal(x.shape)
    expected = numeric_grad(_loss_of(layer, x, g), x)
    layer(x)
    assert np.all(np.isin(np.round(layer.last_r, 12), np.round([1.2, 1 / 1.2], 12)))
    assert np.all(np.abs(layer.last_d) == 0.3)
    np.testing.assert_allclose(layer.backward(g), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- arguments and state
@pytest.mark.parametrize("name,value,error", [
    ("rmax", 0.5, ValueError), ("rmax", float("nan"), ValueError), ("rmax", -1, ValueError),
    ("dmax", -0.1, ValueError), ("dmax", float("nan"), ValueError),
    ("rmax", "3", TypeError), ("dmax", None, TypeError), ("rmax", True, TypeError)])
def test_bad_limits(name, value, error):
    with pytest.raises(error, match=name):
        cpubn.BatchRenorm(3, **{name: value})
    layer = cpubn.BatchRenorm(3, rmax=2, dmax=1)
    with pytest.raises(error, match=name):
        setattr(layer, name, value)
    assert (layer.rmax, layer.dmax) == (2.0, 1.0)


def test_limits_are_plain_attributes(rng):
    layer = cpubn.BatchRenorm(3)
    layer.rmax, layer.dmax = 1, 0
    layer.rmax = np.float32(2.5)
    layer.dmax = float("inf")
    assert (layer.rmax, layer.dmax) == (2.5, float("inf"))
    assert not hasattr(cpubn.BatchRenorm(3), "track_running_stats") or \
        cpubn.BatchRenorm(3).track_running_stats is True
    with pytest.raises(TypeError):
        cpubn.BatchRenorm(3, track_running_stats=False)


@pytest.mark.parametrize("bad", ["wrong channels", "one value per channel", "dtype", "out"])
def test_failed_call_changes_nothing(bad, rng):
    layer, _ = renorm_pair(rng, 3, np.float32, 1)
    layer(make_x(rng, (4, 3, 2), np.float32, 1))
    layer.backward(np.ones((4, 3, 2), np.float32))
    before, last = snapshot(layer), (layer.last_r.copy(), layer.last_d.copy())
    x = make_x(rng, (4, 3, 2), np.float32, 1)
    args = {"wrong channels": (make_x(rng, (4, 5, 2), np.float32, 1),),
            "one value per channel": (x[:1, :, :1],),
            "dtype": (x.astype(np.int32),),
            "out": (x, np.empty((4, 3, 3), np.float32))}[bad]
    with pytest.raises((ValueError, TypeError)):
        layer(*args)
    assert_same_state(layer, before)
    assert bitwise_equal(layer.last_r, last[0]) and bitwise_equal(layer.last_d, last[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_and_save_load_round_trip(dtype, tmp_path, rng):
    layer, _ = renorm_pair(rng, 4, dtype, -1, rmax=2.5, dmax=0.75)
    layer.eps, layer.momentum = 1e-3, 0.2
    layer(make_x(rng, (6, 4), dtype, -1))
    state = layer.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var",
                             "weight"]
    copy = cpubn.BatchRenorm(4, axis=-1, dtype=dtype)
    copy.load_state_dict(state)
    for key, value in state.items():
        assert bitwise_equal(getattr(copy, key), value)
    layer.eval()
    path = layer.save(tmp_path / "renorm") or tmp_path / "renorm.npz"
    loaded = cpubn.BatchRenorm.load(path)
    assert type(loaded) is cpubn.BatchRenorm
    assert (loaded.rmax, loaded.dmax, loaded.eps, loaded.momentum, loaded.axis,
            loaded.dtype, loaded.training) == (2.5, 0.75, 1e-3, 0.2, -1, np.dtype(dtype), False)
    assert repr(loaded) == repr(layer)
    assert "rmax=2.5" in repr(loaded) and "dmax=0.75" in repr(loaded)
    x = make_x(rng, (6, 4), dtype, -1)
    assert bitwise_equal(loaded(x), layer(x))


def test_renorm_schedule():
    assert cpubn.renorm_schedule(0) == (1.0, 0.0)
    assert cpubn.renorm_schedule(5000) == (1.0, 0.0)
    rmax, dmax = cpubn.renorm_schedule(15000)
    assert rmax == pytest.approx(1 + 2 * 10000 / 35000) and dmax == pytest.approx(5 * 0.5)
    assert cpubn.renorm_schedule(25000)[1] == 5.0
    assert cpubn.renorm_schedule(10**6) == (3.0, 5.0)
    short = dict(warmup_steps=10, rmax_steps=30, dmax_steps=20, rmax=2.0, dmax=1.0)
    assert cpubn.renorm_schedule(20, **short) == (1.5, 1.0)
    layer = cpubn.BatchRenorm(2)
    layer.rmax, layer.dmax = cpubn.renorm_schedule(25, **short)     # values it accepts
    for bad in (dict(step=-1), dict(step=1.5), dict(step=0, rmax=0.5),
                dict(step=0, warmup_steps=10, rmax_steps=5), dict(step=0, dmax=float("inf"))):
        with pytest.raises(ValueError):
            cpubn.renorm_schedule(**bad)


def test_files_of_other_layers_are_refused(tmp_path):
    cpubn.BatchRenorm(3, rmax=2).save(tmp_path / "renorm")
    cpubn.GhostBatchNorm(3, 4).save(tmp_path / "ghost")
    cpubn.BatchNorm(3).save(tmp_path / "bn")
    for cls, other in ((cpubn.BatchNorm, "renorm"), (cpubn.BatchRenorm, "ghost"),
                       (cpubn.BatchRenorm, "bn"), (cpubn.GhostBatchNorm, "renorm")):
        with pytest.raises(ValueError, match="holds a"):
            cls.load(tmp_path / f"{other}.npz")
    assert cpubn.GhostBatchNorm.load(tmp_path / "ghost.npz").ghost_batch_size == 4
    assert cpubn.BatchRenorm.load(tmp_path / "renorm.npz").rmax == 2.0
