"""Thread control, and bitwise-identical results whatever the thread count."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import cpubn
from bn_testing import assert_close, bitwise_equal, make_params, make_x
from reference import RefBatchNorm

THREAD_COUNTS = [1, 2, 3, 16]

# Inputs of a few MB so that the kernels really split the work.
BIG_CASES = [
    ((16, 64, 32, 32), 1, np.float32),     # NCHW, large C
    ((16, 32, 32, 64), -1, np.float32),    # NHWC, large C
    ((8, 1, 256, 256), 1, np.float32),     # C = 1
    ((4, 256, 256, 3), -1, np.float32),    # channels-last, C = 3
    ((4, 3, 256, 256), 1, np.float64),     # C = 3, float64
    ((200_000, 3), -1, np.float64),        # plain (N, C)
    ((4, 8, 3, 64, 64), 2, np.float32),    # a middle feature axis
]


def all_results(x, dy, axis, dtype, params):
    """Every output of a train step and an eval step, as raw bytes."""
    C = x.shape[axis]
    w, b, rm, rv = params
    bn = cpubn.BatchNorm(C, axis=axis, dtype=dtype)
    bn.weight[...], bn.bias[...], bn.running_mean[...], bn.running_var[...] = w, b, rm, rv
    out = {}
    out["y_train"] = bn(x)
    out["dx_train"] = bn.backward(dy)
    out["running_mean"] = bn.running_mean.copy()
    out["running_var"] = bn.running_var.copy()
    bn.eval()
    out["y_eval"] = bn(x)
    out["dx_eval"] = bn.backward(dy)
    out["grad_weight"] = bn.grad_weight.copy()
    out["grad_bias"] = bn.grad_bias.copy()
    y, mean, invstd = cpubn.batch_norm_forward(x, w, b, training=True, axis=axis)
    out["save_mean"], out["save_invstd"] = mean, invstd
    dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis=axis)
    out["f_dx"], out["f_dw"], out["f_db"] = dx, dw, db
    return out


@pytest.mark.parametrize("shape,axis,dtype", BIG_CASES,
                         ids=[f"{s}-axis{a}-{np.dtype(d).name}" for s, a, d in BIG_CASES])
def test_bitwise_identical_across_thread_counts(shape, axis, dtype, rng):
    C = shape[axis]
    x = make_x(rng, shape, dtype, axis, loc=50.0)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    params = make_params(rng, C, dtype)
    results = {}
    for n in THREAD_COUNTS:
        with cpubn.threads(n):
            assert cpubn.get_num_threads() == (n if cpubn.openmp_enabled() else 1)
            results[n] = all_results(x, dy, axis, dtype, params)
    for n in THREAD_COUNTS[1:]:
        for key, value in results[1].items():
            assert bitwise_equal(results[n][key], value), f"{key} differs between 1 and {n} threads"
    # And the common answer is the right one.
    w, b, rm, rv = params
    expected = RefBatchNorm(C, axis=axis, dtype=dtype, weight=w, bias=b, running_mean=rm, running_var=rv)
    assert_close(results[1]["y_train"], expected(x), dtype)
    assert_close(results[1]["dx_train"], expected.backward(dy), dtype, "grad")


def test_set_get_num_threads():
    for n in (1, 3, 7):
        cpubn.set_num_threads(n)
        assert cpubn.get_num_threads() == (n if cpubn.openmp_enabled() else 1)
    cpubn.set_num_threads(None)
    assert cpubn.get_num_threads() >= 1


def test_negative_counts_back_from_cpu_count():
    cpubn.set_num_threads(-1)
    all_cpus = cpubn.get_num_threads()
    if not cpubn.openmp_enabled():
        assert all_cpus == 1
        return
    candidates = {os.cpu_count(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    assert all_cpus in candidates
    cpubn.set_num_threads(-2)
    assert cpubn.get_num_threads() == max(1, all_cpus - 1)


@pytest.mark.parametrize("bad", [0])
def test_zero_threads_is_an_error(bad):
    cpubn.set_num_threads(2)
    with pytest.raises(ValueError, match="0"):
        cpubn.set_num_threads(bad)
    assert cpubn.get_num_threads() == (2 if cpubn.openmp_enabled() else 1)
    with pytest.raises(ValueError):
        with cpubn.threads(bad):
            pass
    assert cpubn.get_num_threads() == (2 if cpubn.openmp_enabled() else 1)


def test_threads_context_restores():
    expect = (lambda n: n if cpubn.openmp_enabled() else 1)
    cpubn.set_num_threads(2)
    with cpubn.threads(5):
        assert cpubn.get_num_threads() == expect(5)
        with cpubn.threads(3):
            assert cpubn.get_num_threads() == expect(3)
        assert cpubn.get_num_threads() == expect(5)
    assert cpubn.get_num_threads() == expect(2)
    with pytest.raises(RuntimeError):
        with cpubn.threads(4):
            raise RuntimeError("boom")
    assert cpubn.get_num_threads() == expect(2)


def test_threads_context_restores_automatic():
    cpubn.set_num_threads(None)
    auto = cpubn.get_num_threads()
    with cpubn.threads(1):
        assert cpubn.get_num_threads() == 1
    assert cpubn.get_num_threads() == auto


def test_openmp_enabled_is_bool():
    assert isinstance(cpubn.openmp_enabled(), bool)


def _threads_in_subprocess(env_update):
    env = dict(os.environ)
    env.update(env_update)
    code = "import cpubn; print(cpubn.get_num_threads(), cpubn.openmp_enabled())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    n, enabled = res.stdout.split()
    return int(n), enabled == "True"


@pytest.mark.parametrize("omp", ["1", "3"])
def test_default_honours_omp_num_threads(omp):
    n, enabled = _threads_in_subprocess({"OMP_NUM_THREADS": omp})
    assert n == (int(omp) if enabled else 1)


def test_threadpoolctl_limits_respected():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    cpubn.set_num_threads(None)
    x = make_x(np.random.default_rng(0), (8, 4, 64, 64), np.float32)
    cpubn.batch_norm_forward(x)  # make sure the OpenMP runtime is loaded
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cpubn.get_num_threads() == 1
        y1 = cpubn.batch_norm_forward(x)[0]
    if cpubn.openmp_enabled():
        with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
            # a limit, not a request: capped at the CPUs this process may use
            assert cpubn.get_num_threads() == min(3, len(os.sched_getaffinity(0)))
    with cpubn.threads(2):
        assert bitwise_equal(cpubn.batch_norm_forward(x)[0], y1)


# ------------------------------------------------------------------ thread counts
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


# ------------------------------------------------------------------ threads() per Python thread
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


# ------------------------------------------------------------------ OpenMP wait policy
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@pytest.mark.parametrize("user_value", [None, ("OMP_WAIT_POLICY", "active"),
                                        ("GOMP_SPINCOUNT", "5")])
def test_wait_policy_is_not_left_in_the_environment(user_value):
    code = ("import os, cpubn\n"
            f"print([os.environ.get(k) for k in {WAIT_VARIABLES!r}])\n")
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    expected = [None] * len(WAIT_VARIABLES)
    if user_value is not None:
        env[user_value[0]] = user_value[1]
        expected[WAIT_VARIABLES.index(user_value[0])] = user_value[1]
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


def test_automatic_threads_step_down_when_cpus_are_busy(monkeypatch):
    import cpubn._core.threads as thread_control
    big = thread_control.PARALLEL_MIN_ELEMENTS
    cpubn.set_num_threads(None)
    monkeypatch.setattr(thread_control, "get_num_threads", lambda: 4)
    monkeypatch.setattr(thread_control, "_spinning_until", 0.0)

    def idle(value):
        return lambda own_tasks=1: value
    monkeypatch.setattr(thread_control.machine, "idle_cpus", idle(1))     # a busy neighbour
    assert thread_control.threads_for(big) == 1
    monkeypatch.setattr(thread_control.machine, "idle_cpus", idle(3))
    assert thread_control.threads_for(big) == 3
    monkeypatch.setattr(thread_control.machine, "idle_cpus", idle(None))  # nothing known
    assert thread_control.threads_for(big) == 4
    monkeypatch.setattr(thread_control.machine, "idle_cpus", idle(-5))
    assert thread_control.threads_for(big) == 1
    assert thread_control.threads_for(big - 1) == 1
    with cpubn.threads(4):                 # an explicit count is used as is
        assert thread_control.threads_for(big) == 4


def test_eval_calls_parallelize_from_a_larger_size(monkeypatch):
    import cpubn._core.threads as thread_control
    big = thread_control.PARALLEL_MIN_ELEMENTS
    factor = thread_control.EVAL_PARALLEL_FACTOR
    assert factor > 1
    with cpubn.threads(2):
        assert thread_control.threads_for(big) == 2
        assert thread_control.threads_for(big, light=True) == 1
        assert thread_control.threads_for(int(factor * big) - 1, light=True) == 1
        assert thread_control.threads_for(int(factor * big), light=True) == 2


def test_own_spinning_workers_are_not_taken_for_neighbours(monkeypatch):
    """Right after a parallel call its workers still spin: the next call's idle count
    leaves them out, and counts them again once they may have gone to sleep."""
    import cpubn._core.threads as thread_control
    big = thread_control.PARALLEL_MIN_ELEMENTS
    cpubn.set_num_threads(None)
    monkeypatch.setattr(thread_control, "get_num_threads", lambda: 4)
    monkeypatch.setattr(thread_control, "TEAM_SPIN_SECONDS", 3600.0)
    asked = []

    def idle(own_tasks=1):
        asked.append(own_tasks)
        return 4
    monkeypatch.setattr(thread_control.machine, "idle_cpus", idle)
    monkeypatch.setattr(thread_control, "_spinning_until", 0.0)
    thread_control.threads_for(big)
    thread_control.team_finished(1)            # a serial call leaves no team spinning
    thread_control.threads_for(big)
    thread_control.team_finished(3)            # the caller plus two spinning workers
    thread_control.threads_for(big)
    monkeypatch.setattr(thread_control, "_spinning_until", 0.0)    # the window is over
    thread_control.threads_for(big)
    assert asked == [1, 1, 3, 1]


@pytest.fixture
def fake_run_queue(monkeypatch, tmp_path):
    """machine.idle_cpus reading a loadavg file of ours on a 4-CPU machine."""
    import cpubn._core.machine as machine
    loadavg = tmp_path / "loadavg"
    fd = os.open(loadavg, os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(machine, "_loadavg_fd", fd)
    monkeypatch.setattr(machine, "_restricted", False)
    monkeypatch.setattr(machine, "_machine_cpus", 4)
    monkeypatch.setattr(machine, "_usable", 4)

    def set_running(count):
        os.pwrite(fd, f"0.50 0.40 0.30 {count}/321 4242\n".encode().ljust(64), 0)
    yield machine, set_running
    os.close(fd)


def test_idle_cpus_counts_other_tasks(fake_run_queue, monkeypatch):
    machine, set_running = fake_run_queue
    set_running(1)                             # only the caller
    assert machine.idle_cpus() == 4
    set_running(3)                             # the caller and two neighbours
    assert machine.idle_cpus() == 2
    assert machine.idle_cpus(own_tasks=3) == 4     # ... or two of its own workers
    set_running(9)
    assert machine.idle_cpus() == -4
    monkeypatch.setattr(machine, "_usable", 2)     # a CPU quota of 2
    set_running(1)
    assert machine.idle_cpus() == 2


def test_idle_cpus_unknown_for_a_pinned_process(fake_run_queue, monkeypatch):
    """An affinity mask narrower than the machine: the machine-wide run queue says
    nothing about this process's CPUs."""
    machine, set_running = fake_run_queue
    set_running(20)
    monkeypatch.setattr(machine, "_restricted", True)
    assert machine.idle_cpus() is None


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux /proc")
def test_idle_cpus_reads_the_run_queue():
    import cpubn._core.threads as thread_control
    idle = thread_control.machine.idle_cpus()
    assert isinstance(idle, int) and idle <= os.cpu_count()
