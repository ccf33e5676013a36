"""cpubn.BatchNorm object semantics: attributes, modes, running statistics, gradients, resets."""

import numpy as np
import pytest

import cpubn
from bn_testing import DTYPES, assert_close, bitwise_equal, make_x, randomize
from reference import RefBatchNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_defaults(dtype):
    bn = cpubn.BatchNorm(5, dtype=dtype)
    assert bn.num_features == 5 and bn.eps == 1e-5 and bn.momentum == 0.1
    assert bn.affine is True and bn.track_running_stats is True and bn.axis == 1
    assert np.dtype(bn.dtype) == np.dtype(dtype)
    assert bn.training is True
    for name, value in (("weight", 1.0), ("bias", 0.0), ("grad_weight", 0.0), ("grad_bias", 0.0),
                        ("running_mean", 0.0), ("running_var", 1.0)):
        a = getattr(bn, name)
        assert isinstance(a, np.ndarray) and a.shape == (5,) and a.dtype == dtype, name
        assert np.all(a == value), name
    assert bn.num_batches_tracked == 0 and isinstance(bn.num_batches_tracked, (int, np.integer))


def test_default_dtype_is_float32():
    bn = cpubn.BatchNorm(2)
    assert np.dtype(bn.dtype) == np.float32 and bn.weight.dtype == np.float32


def test_no_affine_no_tracking():
    bn = cpubn.BatchNorm(3, affine=False, track_running_stats=False)
    for name in ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var",
                 "num_batches_tracked"):
        assert getattr(bn, name) is None, name


def test_hyperparameters_stored():
    bn = cpubn.BatchNorm(7, eps=1e-3, momentum=None, affine=False, axis=-1, dtype=np.float64)
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.axis) == (7, 1e-3, None, False, -1)


def test_train_eval_return_self():
    bn = cpubn.BatchNorm(2)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(True) is bn and bn.training is True


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_running_stats_over_steps(dtype, momentum, rng):
    bn = cpubn.BatchNorm(4, momentum=momentum, dtype=dtype)
    expected = RefBatchNorm.like(bn)
    for step in range(6):
        # Batches of varying size and statistics.
        x = make_x(rng, (3 + step, 4, 2), dtype, loc=3.0)
        bn(x)
        expected(x)
        assert bn.num_batches_tracked == step + 1
        assert_close(bn.running_mean, expected.running_mean, dtype, "stat", f"mean step {step}")
        assert_close(bn.running_var, expected.running_var, dtype, "stat", f"var step {step}")
    # Eval uses the running statistics just accumulated.
    bn.eval()
    expected.training = False
    x = make_x(rng, (2, 4, 3), dtype)
    assert_close(bn(x), expected(x), dtype)
    assert bn.num_batches_tracked == 6


def test_cumulative_average_is_plain_mean(rng):
    """momentum=None: running stats are the plain average of the batch stats."""
    bn = cpubn.BatchNorm(3, momentum=None, dtype=np.float64)
    xs = [make_x(rng, (4, 3, 5), np.float64, loc=5.0) for _ in range(4)]
    for x in xs:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(axis=(0, 2)) for x in xs], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_var,
                               np.mean([x.var(axis=(0, 2), ddof=1) for x in xs], axis=0), rtol=1e-12)


def test_eval_does_not_update(rng):
    bn = randomize(cpubn.BatchNorm(3, dtype=np.float64), rng).eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn(make_x(rng, (4, 3, 2), np.float64))
    assert bitwise_equal(bn.running_mean, rm) and bitwise_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 0


def test_eval_batch_of_one(rng):
    """The quickstart: inference on x[:1] with running statistics."""
    bn = cpubn.BatchNorm(4)
    x = make_x(rng, (8, 4, 5, 5), np.float32)
    bn(x)
    bn.eval()
    expected = RefBatchNorm.like(bn)
    y = bn(x[:1])
    assert y.shape == (1, 4, 5, 5)
    assert_close(y, expected(x[:1]), np.float32)
    bn1 = cpubn.BatchNorm(4).eval()
    assert_close(bn1(x[:1, :, 0, 0]), x[:1, :, 0, 0] / np.sqrt(1 + 1e-5), np.float32)


def test_no_tracking_uses_batch_stats_in_eval(rng):
    bn = randomize(cpubn.BatchNorm(3, track_running_stats=False, dtype=np.float64), rng)
    x = make_x(rng, (4, 3, 2), np.float64)
    y_train = bn(x)
    y_eval = bn.eval()(x)
    assert_close(y_eval, RefBatchNorm.like(bn)(x), np.float64)
    assert_close(y_eval, y_train, np.float64)
    assert bn.running_mean is None and bn.num_batches_tracked is None


def test_quickstart(rng):
    bn = cpubn.BatchNorm(6)
    x = make_x(rng, (4, 6, 7, 7), np.float32)
    y = bn(x)
    dx = bn.backward(np.ones_like(y))
    # d sum(y) / dx = 0 through the batch statistics; dbias = elements per channel.
    assert np.abs(dx).max() < 1e-4
    np.testing.assert_allclose(bn.grad_bias, np.full(6, 4 * 7 * 7), rtol=1e-6)
    assert np.abs(bn.grad_weight).max() < 1e-3
    bn.eval()
    assert bn(x[:1]).shape == (1, 6, 7, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_grad_accumulation_and_zero_grad(dtype, rng):
    bn = randomize(cpubn.BatchNorm(3, dtype=dtype), rng)
    expected = RefBatchNorm.like(bn)
    for _ in range(3):
        x = make_x(rng, (5, 3, 4), dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        bn(x)
        expected(x)
        bn.backward(dy)
        expected.backward(dy)
    assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad")
    assert_close(bn.grad_bias, expected.grad_bias, dtype, "grad")
    bn.zero_grad()
    assert bn.grad_weight.shape == (3,) and bn.grad_weight.dtype == dtype
    assert np.all(bn.grad_weight == 0) and np.all(bn.grad_bias == 0)
    # After zero_grad the next backward starts from zero.
    expected.grad_weight[:] = 0
    expected.grad_bias[:] = 0
    x = make_x(rng, (5, 3, 4), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    bn(x)
    expected(x)
    bn.backward(dy)
    expected.backward(dy)
    assert_close(bn.grad_weight, expected.grad_weight, dtype, "grad")
    assert_close(bn.grad_bias, expected.grad_bias, dtype, "grad")


def test_zero_grad_no_affine():
    bn = cpubn.BatchNorm(3, affine=False)
    bn.zero_grad()
    assert bn.grad_weight is None and bn.grad_bias is None


def test_weight_edits_are_used(rng):
    """weight/bias are live arrays: editing them in place changes the output."""
    bn = cpubn.BatchNorm(3, dtype=np.float64)
    bn.weight[...] = [2.0, 0.5, -1.0]
    bn.bias[...] = [1.0, 0.0, 3.0]
    x = make_x(rng, (4, 3, 2), np.float64)
    assert_close(bn(x), RefBatchNorm(3, dtype=np.float64, weight=[2.0, 0.5, -1.0],
                                     bias=[1.0, 0.0, 3.0])(x), np.float64)


def test_reset_running_stats(rng):
    bn = randomize(cpubn.BatchNorm(3), rng)
    bn(make_x(rng, (4, 3, 2), np.float32))
    w, b = bn.weight.copy(), bn.bias.copy()
    bn.reset_running_stats()
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1)
    assert bn.num_batches_tracked == 0
    assert bitwise_equal(bn.weight, w) and bitwise_equal(bn.bias, b)
    assert bn.running_mean.dtype == np.float32


def test_reset_parameters(rng):
    bn = randomize(cpubn.BatchNorm(3, dtype=np.float64), rng)
    bn(make_x(rng, (4, 3, 2), np.float64))
    bn.reset_parameters()
    assert np.all(bn.weight == 1) and np.all(bn.bias == 0)
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1)
    assert bn.num_batches_tracked == 0
    assert bn.weight.dtype == np.float64


def test_reset_without_features():
    bn = cpubn.BatchNorm(3, affine=False, track_running_stats=False)
    bn.reset_running_stats()
    bn.reset_parameters()
    assert bn.weight is None and bn.running_mean is None


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -2, -3, -4])
def test_any_axis(axis, rng):
    shape = [2, 3, 4, 5]
    C = shape[axis]
    bn = randomize(cpubn.BatchNorm(C, axis=axis, dtype=np.float64), rng)
    expected = RefBatchNorm.like(bn)
    x = make_x(rng, tuple(shape), np.float64, axis)
    assert_close(bn(x), expected(x), np.float64)
    assert_close(bn.running_var, expected.running_var, np.float64, "stat")


def test_parameters_pairs_track_the_live_arrays():
    bn = cpubn.BatchNorm(4)
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    y = bn(x)
    bn.backward(y)
    pairs = bn.parameters()
    assert [p is q for (p, _), q in zip(pairs, (bn.weight, bn.bias))] == [True, True]
    assert [g is h for (_, g), h in zip(pairs, (bn.grad_weight, bn.grad_bias))] == [True, True]
    for param, grad in pairs:
        param -= 0.5 * grad
    assert not np.array_equal(bn.weight, np.ones(4, np.float32))
    assert cpubn.BatchNorm(4, affine=False).parameters() == []


def test_rebound_parameters_are_checked_and_used():
    x = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    bn = cpubn.BatchNorm(3)
    bn.weight = [1.0, 2.0, 3.0]                # a list works, converted per call
    y = bn(x)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, xhat * np.array([1.0, 2.0, 3.0]), atol=1e-5)
    bn.weight = np.arange(3)                   # integers are not parameters
    with pytest.raises(TypeError, match="float"):
        bn(x)
    bn.weight = np.ones(4, np.float32)         # wrong length
    with pytest.raises(ValueError, match=r"\(4,\)"):
        bn(x)
    bn.weight = np.full(3, 2.0)                # float64 on a float32 layer: converted
    np.testing.assert_allclose(bn(x), 2 * xhat, atol=1e-5)
    bn.weight[...] = 3.0                       # in-place updates of a converted array are seen
    np.testing.assert_allclose(bn(x), 3 * xhat, atol=1e-5)


def test_running_stats_kernel_update_matches_the_numpy_one():
    # Contiguous float32/float64 running statistics are updated by the kernel
    # (_forward.update_running_stats); strided ones take the NumPy expression.  Same bits.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    for dtype in (np.float32, np.float64):
        for momentum in (0.1, None):
            contiguous = cpubn.BatchNorm(5, dtype=dtype, momentum=momentum)
            strided = cpubn.BatchNorm(5, dtype=dtype, momentum=momentum)
            strided.running_mean = np.zeros(10, dtype)[::2]
            strided.running_var = np.ones(10, dtype)[::2]
            for _ in range(3):
                contiguous(x)
                strided(x)
            np.testing.assert_array_equal(contiguous.running_mean, strided.running_mean)
            np.testing.assert_array_equal(contiguous.running_var, strided.running_var)


def test_a_layer_refuses_a_second_thread_during_a_call():
    """Two threads inside one layer would lose running-statistics updates and mix up the
    saved forward: the second call raises RuntimeError while the first runs (its kernel
    releases the GIL), and the first completes unharmed."""
    import threading
    layer = cpubn.BatchNorm(64)
    x = np.random.default_rng(0).standard_normal((64, 64, 64, 64)).astype(np.float32)
    errors, done = [], threading.Event()

    def first_call():
        try:
            layer(x)
        finally:
            done.set()

    worker = threading.Thread(target=first_call)
    worker.start()
    while not layer._busy and not done.is_set():
        pass
    try:
        layer(x[:2])
    except RuntimeError as exc:
        errors.append(str(exc))
    worker.join()
    assert errors and "another thread" in errors[0]
    assert layer.num_batches_tracked == 1
    assert layer.backward(np.ones_like(x)).shape == x.shape      # the first call's forward
    # One thread after another is fine.
    later = threading.Thread(target=layer, args=(x[:4],))
    later.start()
    later.join()
    assert layer.num_batches_tracked == 2


def test_threads_may_share_a_layer_for_inference():
    """Eval-mode forwards change no state: threads serving inference share one layer, and
    each gets the bits a lone call gives."""
    import threading
    layer = cpubn.BatchNorm(64).eval()
    layer.running_mean[...] = np.linspace(-1, 1, 64)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((16, 64, 32, 32)).astype(np.float32) for _ in range(4)]
    expected = [layer(x) for x in inputs]
    results, errors = [None] * 4, []

    def serve(i):
        try:
            for _ in range(5):
                results[i] = layer(inputs[i])
        except Exception as exc:            # pragma: no cover - the failure being tested
            errors.append(exc)

    workers = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert all(bitwise_equal(r, e) for r, e in zip(results, expected))
