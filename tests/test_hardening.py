"""Regression tests for the defects a hostile review found (each failed before its fix),
and the standing leak check.

1 parameter cache vs in-place resize / dtype change; 2 unbounded thread counts;
3 float32 sums overflowing on large finite data; 4 state changed by raising calls;
5 out overlapping per-channel arrays; 6 cpubn.threads() across Python threads;
7 tiny eps; 8 load() of bad files; 9 silent acceptances.
"""
import os
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import assert_same_state, snapshot

LAYOUTS = [((64, 3), 1), ((8, 3, 40), 1), ((4, 3, 3000), 1), ((8, 5, 3), -1), ((3000, 3), -1)]


def _x(rng, shape, scale=1.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ 1. parameter cache
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_in_place_resize_of_a_cached_parameter_is_caught(name, rng):
    bn = cpubn.BatchNorm(64)
    x = _x(rng, (8, 64))
    bn(x)                                   # caches the parameter check
    getattr(bn, name).resize(1, refcheck=False)
    bn.eval()
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        bn(x)


@pytest.mark.parametrize("name", ["weight", "running_var"])
def test_in_place_dtype_change_of_a_cached_parameter_is_caught(name, rng):
    bn = cpubn.BatchNorm(64)
    x = _x(rng, (8, 64))
    bn.eval()
    bn(x)
    getattr(bn, name).dtype = np.float64    # same memory read as 32 doubles
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        bn(x)


def test_reassigned_parameter_of_another_dtype_is_used(rng):
    bn = cpubn.BatchNorm(4).eval()
    x = _x(rng, (8, 4))
    bn(x)
    bn.weight = np.full(4, 2.0)             # float64 array into a float32 layer
    expected = ref.functional_forward(x, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, training=False)[0]
    np.testing.assert_allclose(bn(x), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ 2. thread counts
@pytest.mark.parametrize("count", [40000, 2**40, cpubn._core.threads.MAX_THREADS + 1])
def test_huge_thread_counts_raise(count):
    with pytest.raises(ValueError, match="at most"):
        cpubn.set_num_threads(count)
    with pytest.raises(ValueError, match="at most"):
        with cpubn.threads(count):
            pass
    assert cpubn.get_num_threads() <= cpubn._core.threads.MAX_THREADS


def test_huge_omp_num_threads_does_not_kill_the_interpreter():
    code = ("import numpy as np, cpubn\n"
            "x = np.random.rand(64, 8, 32, 32).astype(np.float32)\n"
            "cpubn.BatchNorm(8)(x)\n"
            "print(cpubn.get_num_threads())\n")
    env = dict(os.environ, OMP_NUM_THREADS="40000")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) <= cpubn._core.threads.MAX_THREADS


# ------------------------------------------------------------------ 3. overflow of float32 sums
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_large_finite_float32_data_is_normalized_exactly(shape, axis, scale, rng):
    x = _x(rng, shape, scale)
    bn = cpubn.BatchNorm(3, axis=axis)
    y = bn(x)
    expected, mean, invstd, _, _ = ref.functional_forward(x, axis=axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_large_finite_gradients_are_exact(shape, axis, training, rng):
    x = _x(rng, shape, 1e19)
    dy = _x(rng, shape, 1e33)          # dy * (x - mean) overflows float32; the sums do not
    bn = cpubn.BatchNorm(3, axis=axis)
    bn(x)                                   # fills the running statistics
    bn.train(training)
    bn(x)
    dx = bn.backward(dy)
    if training:
        _, mean, invstd, _, _ = ref.functional_forward(x, axis=axis)
    else:
        mean = bn.running_mean.astype(np.float64)
        invstd = ref.invstd_of(bn.running_var, bn.eps)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, training=training, axis=axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6 * np.abs(dx_ref).max())
    np.testing.assert_allclose(bn.grad_weight, dw_ref, rtol=1e-5)
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-5,
                               atol=1e-6 * np.abs(dy).sum(axis=tuple(
                                   i for i in range(dy.ndim) if i != axis % dy.ndim)).max())


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_nan_still_propagates_only_in_its_channel(shape, axis, rng):
    x = _x(rng, shape, 1e30)
    index = [0] * x.ndim
    index[axis % x.ndim] = 1
    x[tuple(index)] = np.nan
    y = cpubn.BatchNorm(3, axis=axis)(x)
    channels = np.moveaxis(y, axis, -1).reshape(-1, 3)
    assert np.isnan(channels[:, 1]).all()
    assert np.isfinite(channels[:, [0, 2]]).all()


# ------------------------------------------------------------------ 4. failed calls change nothing
def test_read_only_running_mean_raises_before_counting(rng):
    bn = cpubn.BatchNorm(3)
    bn.running_mean.flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        bn(_x(rng, (8, 3)))
    assert_same_state(bn, before)
    assert bn.num_batches_tracked == 0


def test_read_only_grad_bias_raises_before_accumulating(rng):
    bn = cpubn.BatchNorm(3)
    y = bn(_x(rng, (8, 3)))
    bn.grad_bias.flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        bn.backward(np.ones_like(y))
    assert_same_state(bn, before)
    assert not bn.grad_weight.any()


@pytest.mark.parametrize("name", ["running_mean", "grad_weight"])
def test_list_state_raises_before_any_write(name, rng):
    bn = cpubn.BatchNorm(3)
    y = bn(_x(rng, (8, 3)))
    setattr(bn, name, [0.0, 0.0, 0.0])
    count = bn.num_batches_tracked
    with pytest.raises(TypeError, match=name):
        bn(_x(rng, (8, 3))) if name == "running_mean" else bn.backward(np.ones_like(y))
    assert bn.num_batches_tracked == count


# ------------------------------------------------------------------ 5. out vs per-channel arrays
def test_functional_out_overlapping_running_mean_raises():
    x = np.random.default_rng(0).standard_normal((8, 3))
    buf = np.zeros((8, 3))
    with pytest.raises(ValueError, match="running_mean"):
        cpubn.batch_norm(x, buf[-1], np.ones(3), training=True, out=buf)
    assert not buf.any()


@pytest.mark.parametrize("name", ["weight", "bias", "running_var"])
def test_functional_out_overlapping_a_parameter_raises(name, rng):
    x = rng.standard_normal((8, 3))
    buf = np.ones((8, 3))
    arrays = {"running_mean": np.zeros(3), "running_var": np.ones(3), "weight": None,
              "bias": None}
    arrays[name] = buf[2]
    with pytest.raises(ValueError, match=name):
        cpubn.batch_norm(x, training=True, out=buf, **arrays)


@pytest.mark.parametrize("name", ["running_mean", "weight", "grad_bias"])
def test_layer_out_overlapping_its_state_raises(name, rng):
    bn = cpubn.BatchNorm(3, dtype=np.float64)
    buf = np.zeros((8, 3))
    setattr(bn, name, buf[0])
    x = rng.standard_normal((8, 3))
    with pytest.raises(ValueError, match=name):
        bn(x, out=buf)
    y = bn(x)
    with pytest.raises(ValueError, match=name):
        bn.backward(np.ones_like(y), out=buf)


# ------------------------------------------------------------------ 6. threads() per Python thread
def test_threads_context_is_per_python_thread():
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def first():
        with cpubn.threads(1):
            steps[0].set()
            steps[1].wait(10)               # the other thread entered threads(3)
            seen["first inside"] = cpubn.get_num_threads()
        steps[2].set()                      # leave first: out of order
        seen["first after"] = cpubn.get_num_threads()

    def second():
        steps[0].wait(10)
        with cpubn.threads(3):
            steps[1].set()
            steps[2].wait(10)
            seen["second inside"] = cpubn.get_num_threads()
        seen["second after"] = cpubn.get_num_threads()

    automatic = cpubn.get_num_threads()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"first inside": 1, "second inside": 3, "first after": automatic,
                    "second after": automatic}
    assert cpubn.get_num_threads() == automatic


# ------------------------------------------------------------------ 7. tiny eps
def test_eps_too_small_for_float32_raises():
    with pytest.raises(ValueError, match="eps"):
        cpubn.BatchNorm(3, eps=1e-78)
    with pytest.raises(ValueError, match="eps"):
        cpubn.batch_norm(np.ones((4, 3)), None, None, training=True, eps=1e-80)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((4, 5, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_smallest_eps_gives_bias_on_a_constant_channel(shape, axis, dtype):
    eps = cpubn._core.validation.EPS_MIN
    bn = cpubn.BatchNorm(3, eps=eps, axis=axis)
    bn.bias[...] = [0.5, -1.0, 2.0]
    x = np.full(shape, 3.0, dtype)
    y = bn(x)
    expected = np.moveaxis(np.broadcast_to(bn.bias, np.moveaxis(x, axis, -1).shape), -1, axis)
    assert np.array_equal(y, expected.astype(dtype))
    dx = bn.backward(np.ones_like(y))
    assert np.isfinite(dx).all()
    bn.eval()
    assert np.isfinite(bn(x)).all()


# ------------------------------------------------------------------ 8. load() of bad files
def _saved(tmp_path):
    bn = cpubn.BatchNorm(4)
    bn(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    path = tmp_path / "bn"
    bn.save(path)
    return bn, tmp_path / "bn.npz"


def test_save_and_load_take_the_same_path(tmp_path):
    bn, _ = _saved(tmp_path)
    restored = cpubn.BatchNorm.load(tmp_path / "bn")
    for key, value in bn.state_dict().items():
        assert np.array_equal(restored.state_dict()[key], value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        cpubn.BatchNorm.load(tmp_path / "nothing.npz")


def _rewrite(path, drop=(), **replace):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    arrays.update(replace)
    np.savez(path, **arrays)


BAD_FILES = {
    "random bytes": lambda p: p.write_bytes(os.urandom(300)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
    "empty zip": lambda p: zipfile.ZipFile(p, "w").close(),
    "numpy array": lambda p: np.save(open(p, "wb"), np.zeros(3)),
    "no config": lambda p: _rewrite(p, drop=("config",)),
    "config not json": lambda p: _rewrite(p, config=np.array("{not json")),
    "config a list": lambda p: _rewrite(p, config=np.array("[1, 2]")),
    "wrong format": lambda p: _rewrite(p, config=np.array('{"format": 7}')),
    "unknown hyperparameter": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": 4, "colour": "red"}')),
    "bad hyperparameter": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": -4}')),
    "training not bool": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": "yes", "num_features": 4}')),
    "missing state": lambda p: _rewrite(p, drop=("running_var",)),
    "wrong state shape": lambda p: _rewrite(p, weight=np.ones(5, np.float32)),
    "object array": lambda p: _rewrite(p, weight=np.array([object()] * 4)),
    "other layer": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": 4, "layer": "GhostOfBatchNorm"}')),
}


@pytest.mark.parametrize("damage", sorted(BAD_FILES))
def test_bad_file_raises_value_error_naming_it(damage, tmp_path):
    _, path = _saved(tmp_path)
    try:
        BAD_FILES[damage](path)
    except ValueError:                      # np.savez refuses object arrays: write by hand
        pytest.skip("numpy refuses to write this damage")
    with pytest.raises(ValueError, match="bn.npz"):
        cpubn.BatchNorm.load(path)


# ------------------------------------------------------------------ 9. silent acceptances
def test_functional_training_with_list_running_stats_raises():
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="running_mean"):
        cpubn.batch_norm(x, [0.0, 0.0, 0.0], np.ones(3), training=True)
    # read-only use of lists stays fine
    y = cpubn.batch_norm(x, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], training=False)
    assert y.shape == x.shape


@pytest.mark.parametrize("flag", ["no", 1, None, np.float64(1.0)])
def test_training_flag_must_be_bool(flag):
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="training"):
        cpubn.batch_norm_forward(x, training=flag)
    y, mean, invstd = cpubn.batch_norm_forward(x)
    with pytest.raises(TypeError, match="training"):
        cpubn.batch_norm_backward(np.ones_like(y), x, mean, invstd, training=flag)
    with pytest.raises(TypeError, match="mode"):
        cpubn.BatchNorm(3).train(flag)


@pytest.mark.parametrize("axis", [True, False, np.bool_(True)])
def test_bool_axis_is_rejected_everywhere(axis):
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="axis"):
        cpubn.batch_norm_forward(x, axis=axis)
    with pytest.raises(TypeError, match="axis"):
        cpubn.BatchNorm(3, axis=axis)


def test_masked_arrays_are_rejected():
    x = np.ma.masked_array(np.random.default_rng(0).standard_normal((8, 3)),
                           mask=np.zeros((8, 3), bool))
    with pytest.raises(TypeError, match="masked"):
        cpubn.BatchNorm(3, dtype=np.float64)(x)
    with pytest.raises(TypeError, match="masked"):
        cpubn.batch_norm_forward(x.data, weight=np.ma.masked_array(np.ones(3)))


def test_self_overlapping_out_is_rejected():
    x = np.random.default_rng(0).standard_normal((8, 3))
    broadcast = np.lib.stride_tricks.as_strided(np.zeros(3), shape=(8, 3), strides=(0, 8))
    assert broadcast.flags.writeable
    with pytest.raises(ValueError, match="overlapping"):
        cpubn.batch_norm_forward(x, out=broadcast)
    sliced = np.zeros((16, 6))[::2, ::2]      # gaps, but no overlap: accepted
    assert cpubn.batch_norm_forward(x, out=sliced)[0] is sliced


def test_loading_values_beyond_the_layer_dtype_raises():
    bn = cpubn.BatchNorm(3)
    state = bn.state_dict()
    state["running_var"] = np.array([1.0, 1e300, 1.0])
    with pytest.raises(ValueError, match="range"):
        bn.load_state_dict(state)
    assert np.array_equal(bn.running_var, np.ones(3, np.float32))
    state["running_var"] = np.array([1.0, np.inf, 1.0])     # an inf that is really there
    bn.load_state_dict(state)
    assert np.isinf(bn.running_var[1])


# ------------------------------------------------------------------ leaks
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif(os.environ.get("CPUBN_SANITIZED") == "1",
                    reason="AddressSanitizer keeps freed memory in quarantine (RSS grows); "
                           "the ordinary run checks leaks")
def test_no_leak_over_many_calls_including_raising_ones():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 6)).astype(np.float32)
    bad = rng.standard_normal((16, 5, 6)).astype(np.float32)
    bn = cpubn.BatchNorm(8, activation="relu")

    def round_of_calls():
        y = bn(x, residual=x)
        bn.backward(np.ones_like(y))
        cpubn.batch_norm(x, None, None, training=True)
        for call in (lambda: bn(bad), lambda: cpubn.batch_norm(x, [0.0] * 8, None,
                                                              training=True)):
            try:
                call()
            except (TypeError, ValueError):
                pass

    for _ in range(2000):                   # warm up caches and allocator pools
        round_of_calls()
    before = _rss_bytes()
    for _ in range(5000):
        round_of_calls()
    grown = _rss_bytes() - before
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 5000 rounds"


# ------------------------------------------------------------------ OpenMP wait policy
@pytest.mark.parametrize("user_value", [None, "active"])
def test_wait_policy_is_not_left_in_the_environment(user_value):
    code = ("import os, cpubn\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(user_value)


def test_automatic_threads_step_down_when_cpus_are_busy(monkeypatch):
    import cpubn._core.threads as thread_control
    big = thread_control.PARALLEL_MIN_ELEMENTS
    cpubn.set_num_threads(None)
    monkeypatch.setattr(thread_control, "get_num_threads", lambda: 4)
    monkeypatch.setattr(thread_control.machine, "idle_cpus", lambda: 1)     # a busy neighbour
    assert thread_control.threads_for(big) == 1
    monkeypatch.setattr(thread_control.machine, "idle_cpus", lambda: 3)
    assert thread_control.threads_for(big) == 3
    monkeypatch.setattr(thread_control.machine, "idle_cpus", lambda: None)   # no /proc/loadavg
    assert thread_control.threads_for(big) == 4
    monkeypatch.setattr(thread_control.machine, "idle_cpus", lambda: -5)
    assert thread_control.threads_for(big) == 1
    assert thread_control.threads_for(big - 1) == 1
    with cpubn.threads(4):                 # an explicit count is used as is
        assert thread_control.threads_for(big) == 4


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux /proc")
def test_idle_cpus_reads_the_run_queue():
    import cpubn._core.threads as thread_control
    idle = thread_control.machine.idle_cpus()
    assert isinstance(idle, int) and idle <= os.cpu_count()


@pytest.mark.parametrize("call", ["zero_grad", "reset_running_stats", "reset_parameters",
                                  "load_state_dict"])
def test_multi_array_writes_fail_before_the_first(call, rng):
    bn = cpubn.BatchNorm(3)
    y = bn(_x(rng, (8, 3)) * 3 + 1)
    bn.backward(np.ones_like(y))
    bn.weight[...] = 2.0
    state = {k: v + 1 for k, v in bn.state_dict().items()}
    last = {"zero_grad": "grad_bias", "reset_running_stats": "running_var",
            "reset_parameters": "running_var", "load_state_dict": "running_var"}[call]
    getattr(bn, last).flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        getattr(bn, call)(state) if call == "load_state_dict" else getattr(bn, call)()
    assert_same_state(bn, before)
