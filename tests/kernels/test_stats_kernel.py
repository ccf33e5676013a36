"""_forward.batch_stats (the statistics of a training forward without its output, used by
BatchRenorm): bitwise the statistics forward_train computes, any layout, dtype and thread
count, and its boundary checks."""
import numpy as np
import pytest

from cpubn._kernels import forward as _forward

HALF = [np.float16]
try:
    import ml_dtypes
    HALF.append(ml_dtypes.bfloat16)
except ImportError:
    pass


# (N, C, S): channel blocks, the few-channels split path, runs longer than one chunk
# (RUN_CHUNK = 16384), channels-last rows (S == 1) with one and many row blocks.
DIMS = [(4, 64, 49), (3, 2, 100), (2, 3, 40000), (5, 1, 7), (700, 130, 1), (9, 3, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_same_bits_as_forward_train(dtype, dims, n_threads, rng):
    n, c, s = dims
    x = (rng.standard_normal(n * c * s) * 3 + 100).astype(dtype)
    x_before = x.copy()
    expected = np.empty(3 * c)
    _forward.forward_train(x, np.empty_like(x), None, None, 1e-5, expected, n, c, s,
                           n_threads, False)
    got = np.full(3 * c, np.nan)
    _forward.batch_stats(x, 1e-5, got, n, c, s, n_threads)
    assert got.tobytes() == expected.tobytes()
    assert x.tobytes() == x_before.tobytes()
    other = np.full(3 * c, np.nan)
    _forward.batch_stats(x, 1e-5, other, n, c, s, 3 - n_threads)
    assert other.tobytes() == got.tobytes()          # whatever the thread count


def test_boundary_checks():
    x = np.ones(24, np.float32)
    stats = np.empty(9)
    _forward.batch_stats(x, 1e-5, stats, 2, 3, 4, 1)
    bad_calls = [
        (x, stats, 2, 3, 5, 1),                  # N*C*S is not x's size
        (x, np.empty(8), 2, 3, 4, 1),            # stats too short
        (x, np.empty(9, np.float32), 2, 3, 4, 1),   # stats not float64
        (x[::2], stats, 1, 3, 4, 1),             # not contiguous
        (x.astype(np.int32), stats, 2, 3, 4, 1),
        (x[:0], stats, 0, 3, 4, 1),              # no values
        (x, stats, 2, 3, 4, 0),                  # no thread
        (list(x), stats, 2, 3, 4, 1),
    ]
    for args in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            _forward.batch_stats(args[0], 1e-5, *args[1:])
    read_only = np.empty(9)
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        _forward.batch_stats(x, 1e-5, read_only, 2, 3, 4, 1)
