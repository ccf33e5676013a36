"""No hidden full-size temporaries: a training forward allocates only its output, a
backward only dx, and with out= neither allocates anything full-size (tracemalloc sees
NumPy's allocations)."""
import os
import tracemalloc

import numpy as np
import pytest

import cpubn

SHAPES = [((16, 32, 32, 32), 1), ((16, 32, 32, 32), -1), ((64, 6, 40, 40), 1)]


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_forward_allocates_only_its_output(shape, axis, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    bn = cpubn.BatchNorm(shape[axis], axis=axis)
    bn(x)                                     # warm the layout cache
    peak, _ = _peak_bytes(lambda: bn(x))
    assert peak < x.nbytes * 1.1 + 65536      # y, plus per-channel scraps
    out = np.empty_like(x)
    peak, _ = _peak_bytes(lambda: bn(x, out=out))
    assert peak < x.nbytes * 0.1


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_backward_allocates_only_dx(shape, axis, training):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn = cpubn.BatchNorm(shape[axis], axis=axis).train(training)
    bn(x)
    peak, _ = _peak_bytes(lambda: bn.backward(dy))
    assert peak < x.nbytes * 1.1 + 65536
    dx = np.empty_like(x)
    peak, _ = _peak_bytes(lambda: bn.backward(dy, out=dx))
    assert peak < x.nbytes * 0.1


def test_eval_forward_with_out_allocates_nothing_full_size():
    x = np.random.default_rng(2).standard_normal((8, 64, 32, 32)).astype(np.float32)
    bn = cpubn.BatchNorm(64).eval()
    out = np.empty_like(x)
    bn(x, out=out)
    peak, result = _peak_bytes(lambda: bn(x, out=out))
    assert result is out
    assert peak < x.nbytes * 0.1


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
