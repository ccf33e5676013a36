"""Channels-last inputs with few rows: the statistics and gradient sums take column tiles
of all rows (src/cpubn/_kernels/partition.pxd: uses_columns, column_width), each tile's
results complete, instead of row blocks combined per channel.

Checked here: results against the float64 reference (a large offset, constant and
non-finite channels included), the bits whatever the thread count, and the rows at the
edge of the rule, for channel counts that are not a multiple of the tile width.
"""
import numpy as np
import pytest

import cpubn
import cpubn._core.threads
from bn_testing import assert_close, bitwise_equal, make_x
import reference as ref

# The largest row count that takes the tiles: COLUMN_TILE_BYTES // (itemsize * the
# minimum tile width), as partition.pxd has it.
TILE_BYTES, MIN_WIDTH = 32768, 128
LAST_ROWS = {np.float32: TILE_BYTES // (4 * MIN_WIDTH), np.float64: TILE_BYTES // (8 * MIN_WIDTH)}

CASES = [(2, 700, np.float32), (8, 5000, np.float32), (64, 129, np.float32),
         (64, 4100, np.float32), (65, 1000, np.float32), (33, 2049, np.float64),
         (32, 300, np.float64), (3, 1, np.float32), (17, 40, np.float64)]


@pytest.fixture(autouse=True)
def parallel_small_calls(monkeypatch):
    # As the other kernel tests do: small inputs take the threaded paths too.
    monkeypatch.setattr(cpubn._core.threads, "PARALLEL_MIN_ELEMENTS", 1 << 10)


def test_the_row_rule_matches_partition():
    assert LAST_ROWS == {np.float32: 64, np.float64: 32}


def _run(x, dy, w, b):
    y, mean, invstd = cpubn.batch_norm_forward(x, w, b, training=True, axis=-1)
    dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, w, axis=-1)
    return y, mean, invstd, dx, dw, db


@pytest.mark.parametrize("R,C,dtype", CASES,
                         ids=[f"{r}x{c}-{np.dtype(d).name}" for r, c, d in CASES])
def test_against_the_reference_at_an_offset(rng, R, C, dtype):
    x = make_x(rng, (R, C), dtype, axis=-1, loc=1e4)      # a large offset
    dy = rng.standard_normal((R, C)).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    y, mean, invstd, dx, dw, db = _run(x, dy, w, b)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    y_ref, mean_ref, invstd_ref, _, _ = ref.functional_forward(x64, w64, b64, axis=-1)
    dx_ref, dw_ref, db_ref = ref.backward(dy.astype(np.float64), x64, mean_ref, invstd_ref,
                                          w64, axis=-1)
    # float64-grade statistics: the mean of data at 1e4 within 1e-6 of the reference
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    assert_close(y, y_ref, dtype, "value", "forward")
    assert_close(dx, dx_ref, dtype, "grad", "dx")
    assert_close(dw, dw_ref, dtype, "grad", "dweight")
    assert_close(db, db_ref, dtype, "grad", "dbias")


@pytest.mark.parametrize("R,C,dtype", CASES,
                         ids=[f"{r}x{c}-{np.dtype(d).name}" for r, c, d in CASES])
def test_bits_do_not_depend_on_the_thread_count(rng, R, C, dtype):
    x = make_x(rng, (R, C), dtype, axis=-1)
    dy = rng.standard_normal((R, C)).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    with cpubn.threads(1):
        first = _run(x, dy, w, b)
    for n in (2, 3, 7):
        with cpubn.threads(n):
            again = _run(x, dy, w, b)
        assert all(bitwise_equal(a, c) for a, c in zip(first, again)), n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_and_non_finite_channels(rng, dtype):
    R, C = LAST_ROWS[dtype], 300
    x = make_x(rng, (R, C), dtype, axis=-1)
    x[:, 5] = 3.25                          # constant: variance exactly 0, y = bias
    x[7, 130] = np.nan                      # in the second tile
    x[0, 299] = np.inf                      # in the last, partial tile
    y, mean, invstd = cpubn.batch_norm_forward(x, None, np.full(C, 0.5, dtype),
                                               training=True, axis=-1)
    assert mean[5] == 3.25 and np.all(y[:, 5] == 0.5)
    assert np.isnan(mean[130]) and np.all(np.isnan(y[:, 130]))
    assert mean[299] == np.inf and np.all(np.isnan(y[:, 299]))
    finite = np.ones(C, bool)
    finite[[130, 299]] = False
    mean_ref = x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mean[finite], mean_ref[finite], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_sides_of_the_row_rule(rng, dtype):
    """The last row count on tiles and the first on row blocks give the reference's
    results alike."""
    for R in (LAST_ROWS[dtype], LAST_ROWS[dtype] + 1):
        x = make_x(rng, (R, 1000), dtype, axis=-1, loc=50.0)
        dy = rng.standard_normal((R, 1000)).astype(dtype)
        y, mean, invstd, dx, dw, db = _run(x, dy, None, None)
        x64 = x.astype(np.float64)
        y_ref, mean_ref, invstd_ref, _, _ = ref.functional_forward(x64, axis=-1)
        dx_ref, _, db_ref = ref.backward(dy.astype(np.float64), x64, mean_ref, invstd_ref,
                                         axis=-1)
        assert_close(y, y_ref, dtype, "value", f"forward, {R} rows")
        assert_close(dx, dx_ref, dtype, "grad", f"dx, {R} rows")
        assert_close(db, db_ref, dtype, "grad", f"dbias, {R} rows")
