"""The compiled entry points check what they are given (STYLE.md 15).

cpubn._core.validation checks user input; these tests call cpubn._kernels.forward /
cpubn._kernels.backward directly with buffers that do not match the (N, C, S) view,
dtypes they have no loops for and impossible combinations, and expect TypeError /
ValueError, never a silent no-op or an out-of-bounds access.
"""
import numpy as np
import pytest

from cpubn._kernels import backward as _backward, forward as _forward

N, C, S = 2, 3, 5


def arrays(dtype=np.float32, param_dtype=np.float32):
    x = np.linspace(-1, 1, N * C * S).astype(dtype)
    return dict(x=x, y=np.empty_like(x), weight=np.ones(C, param_dtype),
                bias=np.zeros(C, param_dtype), mean=np.zeros(C, param_dtype),
                var=np.ones(C, param_dtype), stats=np.empty(3 * C))


def train(a, **over):
    a = {**a, **over}
    return _forward.forward_train(a["x"], a["y"], a["weight"], a["bias"], 1e-5, a["stats"],
                                  a.get("N", N), a.get("C", C), a.get("S", S),
                                  a.get("n_threads", 1), False, a.get("residual"),
                                  a.get("relu", False))


def evaluate(a, **over):
    a = {**a, **over}
    return _forward.forward_eval(a["x"], a["y"], a["mean"], a["var"], a["weight"], a["bias"],
                                 1e-5, a["stats"], a.get("N", N), a.get("C", C),
                                 a.get("S", S), 1, False, a.get("residual"), False)


def backward(a, **over):
    a = {**a, **over}
    dy = a.get("dy", np.ones_like(a["x"]))
    dx = a.get("dx", np.empty_like(a["x"]))
    stats = a.get("bstats", np.concatenate([np.zeros(C), np.ones(C)]))
    grads = a.get("grads", np.empty(2 * C))
    return _backward.backward(dy, a["x"], dx, stats, a["weight"], True, grads,
                              a.get("N", N), a.get("C", C), a.get("S", S), 1, False,
                              a.get("yy"), a.get("dresidual"))


def test_valid_calls_run():
    a = arrays()
    train(a)
    evaluate(a)
    backward(a)
    b = arrays(np.float64, np.float64)
    train(b, weight=None, bias=None)
    backward(b, weight=None)


def test_unknown_dtype_is_a_type_error():
    # An unknown dtype used to fall through to the bfloat16 loops.
    for dtype in (np.int16, np.uint16, np.complex64, np.int64):
        a = arrays()
        x = np.zeros(N * C * S, dtype)
        with pytest.raises(TypeError, match="dtype"):
            train(a, x=x, y=np.empty_like(x))
        with pytest.raises(TypeError, match="dtype"):
            evaluate(a, x=x, y=np.empty_like(x))
        with pytest.raises(TypeError, match="dtype"):
            backward(a, x=x, dy=np.zeros_like(x), dx=np.empty_like(x))


@pytest.mark.parametrize("name", ["y", "residual"])
def test_forward_data_arrays_must_match(name):
    a = arrays()
    with pytest.raises(ValueError, match="elements"):
        train(a, **{name: np.empty(N * C * S - 1, np.float32)})
    with pytest.raises(TypeError, match="dtype"):
        train(a, **{name: np.empty(N * C * S, np.float64)})
    with pytest.raises(ValueError, match="contiguous"):
        train(a, **{name: np.empty(2 * N * C * S, np.float32)[::2]})
    with pytest.raises(TypeError, match="numpy array"):
        train(a, **{name: [0.0] * (N * C * S)})


def test_x_size_and_dims():
    a = arrays()
    with pytest.raises(ValueError, match="elements"):
        train(a, N=N + 1)
    with pytest.raises(ValueError, match="elements"):
        evaluate(a, S=S + 1)
    with pytest.raises(ValueError, match="elements"):
        backward(a, C=C - 1, weight=None, bias=None)
    for dims in (dict(C=0), dict(S=0), dict(N=-1), dict(N=0)):
        with pytest.raises(ValueError, match="dimensions"):
            train(a, **dims)
    with pytest.raises(ValueError, match="n_threads"):
        train(a, n_threads=0)
    with pytest.raises(ValueError, match="overflows"):
        train(a, N=1 << 40, C=1 << 20, S=1 << 10)


def test_read_only_outputs():
    a = arrays()
    y = np.empty_like(a["x"])
    y.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        train(a, y=y)
    stats = np.empty(3 * C)
    stats.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        train(a, stats=stats)
    with pytest.raises(ValueError, match="writeable"):
        backward(a, dx=y)


def test_statistics_buffers():
    a = arrays()
    with pytest.raises(ValueError, match="at least 9"):
        train(a, stats=np.empty(3 * C - 1))
    evaluate(a, stats=np.empty(2 * C))            # eval writes mean and invstd only
    with pytest.raises(ValueError, match="at least 6"):
        evaluate(a, stats=np.empty(2 * C - 1))
    with pytest.raises(TypeError, match="float64"):
        train(a, stats=np.empty(3 * C, np.float32))
    with pytest.raises(ValueError, match="at least 6"):
        backward(a, bstats=np.zeros(2 * C - 1))
    with pytest.raises(ValueError, match="at least 6"):
        backward(a, grads=np.empty(2 * C - 1))


def test_per_channel_arrays():
    a = arrays()
    with pytest.raises(ValueError, match="weight has 2 elements"):
        train(a, weight=np.ones(C - 1, np.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        train(a, bias=np.zeros(C, np.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        train(a, weight=np.ones(C, np.int32))
    with pytest.raises(ValueError, match="var has 4 elements"):
        evaluate(a, var=np.ones(C + 1, np.float32))
    with pytest.raises(TypeError, match="needs mean and var"):
        evaluate(a, mean=None)
    with pytest.raises(ValueError, match="contiguous"):
        backward(a, weight=np.ones(2 * C, np.float32)[::2])


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_data_with_float64_parameters_is_impossible(half):
    if half == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.float16
    a = arrays(dtype, np.float64)
    with pytest.raises(TypeError, match="float32 parameters"):
        train(a)
    with pytest.raises(TypeError, match="float32 parameters"):
        evaluate(a)
    with pytest.raises(TypeError, match="float32 parameters"):
        backward(a)
    b = arrays(dtype, np.float32)
    train(b)
    evaluate(b)
    backward(b)


def test_overlapping_buffers():
    a = arrays()
    base = np.zeros(N * C * S + 1, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        train(a, x=base[:-1], y=base[1:])
    train(a, y=a["x"])                             # in place: allowed
    with pytest.raises(ValueError, match="overlap"):
        train(a, residual=a["y"])
    dy = np.ones_like(a["x"])
    backward(a, dy=dy, dx=dy)                      # dx over dy: allowed
    with pytest.raises(ValueError, match="overlap"):
        backward(a, dx=a["x"])
    with pytest.raises(ValueError, match="overlap"):
        backward(a, dy=dy, dresidual=dy)


def test_batch_stats_checks_its_buffers():
    a = arrays()
    _forward.batch_stats(a["x"], 1e-5, np.empty(3 * C), N, C, S, 1)
    with pytest.raises(ValueError, match="elements"):
        _forward.batch_stats(a["x"], 1e-5, np.empty(3 * C), N, C, S + 1, 1)
    with pytest.raises(ValueError, match="at least 9"):
        _forward.batch_stats(a["x"], 1e-5, np.empty(3 * C - 1), N, C, S, 1)
    with pytest.raises(TypeError, match="dtype"):
        _forward.batch_stats(np.zeros(N * C * S, np.int32), 1e-5, np.empty(3 * C), N, C, S, 1)


def update(running_mean, running_var, mean=None, batch_var=None, channels=C, var_scale=10 / 9,
           factor=0.1, counter=None):
    mean = np.zeros(C) if mean is None else mean
    batch_var = np.ones(C) if batch_var is None else batch_var
    _forward.update_running_stats(running_mean, running_var, mean, batch_var, channels,
                                  var_scale, factor, counter)


def test_running_stats_update_checks_its_buffers():
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    update(rm, rv)
    update(None, np.ones(C))                          # either may be absent
    with pytest.raises(ValueError, match="elements"):
        update(np.zeros(C + 1, np.float32), rv)
    with pytest.raises(ValueError, match="elements"):
        update(rm, rv, mean=np.zeros(C - 1))
    with pytest.raises(TypeError, match="float64"):
        update(rm, rv, batch_var=np.ones(C, np.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        update(rm, np.ones(C))
    with pytest.raises(TypeError, match="float32 or float64"):
        update(np.zeros(C, np.float16), None)
    with pytest.raises(ValueError, match="C-contiguous"):
        update(np.zeros(2 * C, np.float32)[::2], None)
    read_only = np.zeros(C, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        update(read_only, rv)
    batch = np.zeros(2 * C)
    with pytest.raises(ValueError, match="overlap"):
        update(batch[:C], None, mean=batch[:C], batch_var=batch[C:])
    with pytest.raises(ValueError, match="impossible"):
        update(rm, rv, var_scale=0.5)                 # no variance scale below 1
    with pytest.raises(ValueError, match="impossible"):
        update(rm, rv, var_scale=float("nan"))
    with pytest.raises(ValueError, match="impossible"):
        update(rm, rv, channels=0)
    counter = np.array([7], np.int64)
    update(rm, rv, counter=counter)
    assert counter[0] == 8                            # the step's count, in the same call
    for bad in (np.array([7], np.int32), np.array([7, 8], np.int64), [7]):
        with pytest.raises(TypeError, match="counter"):
            update(rm, rv, counter=bad)
    frozen = np.array([7], np.int64)
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="counter"):
        update(rm, rv, counter=frozen)


def test_running_stats_update_is_the_float64_blend():
    rng = np.random.default_rng(4)
    mean, batch_var = rng.standard_normal(C), rng.random(C) + 0.5
    for dtype in (np.float32, np.float64):
        rm0 = rng.standard_normal(C).astype(dtype)
        rv0 = (rng.random(C) + 0.5).astype(dtype)
        rm, rv = rm0.copy(), rv0.copy()
        update(rm, rv, mean, batch_var, var_scale=7.0 / 6.0, factor=0.3)
        expect_m = 0.7 * rm0.astype(np.float64) + 0.3 * mean
        expect_v = 0.7 * rv0.astype(np.float64) + 0.3 * (batch_var * 7.0 / 6.0)
        np.testing.assert_allclose(rm, expect_m.astype(dtype), rtol=0, atol=0)
        np.testing.assert_allclose(rv, expect_v.astype(dtype),
                                   rtol=2 * np.finfo(dtype).eps, atol=0)


def test_many_short_runs_keep_the_contract():
    # 300000 batch items of two 3-value runs: the slab kernels (S <= 1024), in 28 batch
    # tiles whose partials are merged per channel.  (The split path's waves, partition.pxd:
    # split_wave, start only past 2^18 runs of more than 1024 values, gigabytes: too large
    # for a test.)  The contract: the same bits on 1 and 2 threads, and the float64
    # reference's statistics and gradient sums to the accuracy the README's Numerics
    # section states (the mean to 1e-12 relative plus 1e-9 of the channel's spread; the
    # variance from float32 group sums of 8 squared deviations, each rounded to float32,
    # whose errors average out over the groups: here about 4e-10 relative).
    import cpubn
    rng = np.random.default_rng(3)
    x = (5 + rng.standard_normal((300000, 2, 3))).astype(np.float32)   # 3 waves
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for n_threads in (1, 2):
        with cpubn.threads(n_threads):
            y, mean, invstd = cpubn.batch_norm_forward(x)
            dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd)
        results.append((y, mean, invstd, dx, dw, db))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(results[0][1], x64.mean(axis=(0, 2)), rtol=1e-12,
                               atol=1e-9 * x64.std(axis=(0, 2)).max())
    np.testing.assert_allclose(results[0][2], 1 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5),
                               rtol=1e-8)
    np.testing.assert_allclose(results[0][5], dy.astype(np.float64).sum(axis=(0, 2)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((9, 70000), np.float64),    # 3 waves of 3 rows
                                          ((4200, 2048), np.float32)])  # 132 blocks: 128 + 4
def test_channels_last_waves_keep_the_contract(shape, dtype):
    # The channels-last statistics and gradient sums work a wave of partials_wave(C) row
    # blocks at a time (partition.pxd), so their scratch does not grow with the rows.
    # These shapes take several waves: the same bits on 1 and 2 threads, and the float64
    # reference's statistics, dx and parameter gradients.
    import cpubn
    rng = np.random.default_rng(5)
    x = (5 + 3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for n_threads in (1, 2):
        with cpubn.threads(n_threads):
            y, mean, invstd = cpubn.batch_norm_forward(x, axis=-1)
            dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, axis=-1)
        results.append((y, mean, invstd, dx, dw, db))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
    y, mean, invstd, dx, dw, db = results[0]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want_invstd = 1 / np.sqrt(x64.var(axis=0) + 1e-5)
    xhat = (x64 - x64.mean(axis=0)) * want_invstd
    want_dx = want_invstd * (dy64 - dy64.mean(axis=0) - xhat * (dy64 * xhat).mean(axis=0))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=tol)
    np.testing.assert_allclose(invstd, want_invstd, rtol=tol)
    np.testing.assert_allclose(y, xhat, rtol=0, atol=10 * tol)
    np.testing.assert_allclose(dx, want_dx, rtol=0, atol=10 * tol * np.abs(want_dx).max())
    np.testing.assert_allclose(db, dy64.sum(axis=0), rtol=tol, atol=tol * shape[0])
    np.testing.assert_allclose(dw, (dy64 * xhat).sum(axis=0), rtol=tol, atol=tol * shape[0])
