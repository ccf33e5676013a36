"""Wide channels-last rows: the element-wise loops' four-rows-per-pass walk.

When a channels-last layer's per-channel constants pass 16 KiB (C > 1365 for float32's
normalization, C > 1024 for its input gradient, half those for float64), the
normalization and the input gradient walk four rows per pass over the channels
(src/cpubn/_kernels/c/loops.h: rows_by_quads). The walk changes the order of the loads
only, never an element's arithmetic, so these tests check:

- the results against the float64 reference, for row counts of every remainder mod 4 and
  channel counts on both sides of the thresholds, forward and backward, in place too;
- the bits: eval is element-wise, so the normalization of a whole batch must equal,
  bit for bit, that of each row alone (one row never takes the four-row walk), with and
  without the fused ReLU / residual epilogue;
- thread-count invariance.
"""
import numpy as np
import pytest

import cpubn
import cpubn._core.threads
from bn_testing import assert_close, bitwise_equal, make_x
import reference as ref

# (C, dtype): each side of each threshold.
WIDE = [(1365, np.float32), (1366, np.float32), (1024, np.float32), (1025, np.float32),
        (2048, np.float32), (682, np.float64), (683, np.float64), (1030, np.float64)]
ROWS = [2, 4, 5, 6, 7, 13]              # every remainder mod 4, and fewer than 4


@pytest.fixture(autouse=True)
def parallel_small_calls(monkeypatch):
    # As the other kernel tests do: small inputs take the threaded paths too.
    monkeypatch.setattr(cpubn._core.threads, "PARALLEL_MIN_ELEMENTS", 1 << 12)


def _layer(rng, C, dtype, activation=None):
    bn = cpubn.BatchNorm(C, axis=-1, dtype=dtype, activation=activation)
    bn.weight[...] = rng.uniform(0.5, 1.5, C)
    bn.bias[...] = rng.uniform(-1, 1, C)
    bn.running_mean[...] = rng.uniform(-1, 1, C)
    bn.running_var[...] = rng.uniform(0.5, 2.0, C)
    return bn


@pytest.mark.parametrize("C,dtype", WIDE, ids=[f"{c}-{np.dtype(d).name}" for c, d in WIDE])
@pytest.mark.parametrize("rows", ROWS)
def test_wide_rows_against_reference(rng, C, dtype, rows):
    x = make_x(rng, (rows, C), dtype, axis=-1, loc=50.0)
    dy = rng.standard_normal((rows, C)).astype(dtype)
    bn = _layer(rng, C, dtype)
    w, b = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    y = bn(x)
    dx = bn.backward(dy)
    y_ref, mean, invstd, _, _ = ref.functional_forward(x.astype(np.float64), w, b, axis=-1)
    dx_ref, dw_ref, db_ref = ref.backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                          invstd, w, axis=-1)
    assert_close(y, y_ref, dtype, "value", "training forward")
    assert_close(dx, dx_ref, dtype, "grad", "backward dx")
    assert_close(bn.grad_weight, dw_ref, dtype, "grad", "grad_weight")
    assert_close(bn.grad_bias, db_ref, dtype, "grad", "grad_bias")

    # In place: y into x's memory, dx into dy's, the same bits as with separate outputs.
    x_in, dy_in = x.copy(), dy.copy()
    again = _layer(np.random.default_rng(0), C, dtype)
    again.weight[...], again.bias[...] = bn.weight, bn.bias
    again(x)
    again.backward(dy_in, out=dy_in)
    assert bitwise_equal(dy_in, dx)
    in_place = _layer(np.random.default_rng(0), C, dtype)
    in_place.weight[...], in_place.bias[...] = bn.weight, bn.bias
    in_place(x_in, out=x_in)
    assert bitwise_equal(x_in, y)


@pytest.mark.parametrize("C,dtype", WIDE, ids=[f"{c}-{np.dtype(d).name}" for c, d in WIDE])
@pytest.mark.parametrize("activation,use_residual", [(None, False), ("relu", False),
                                                     ("relu", True), (None, True)])
def test_wide_eval_rows_are_bitwise_row_by_row(rng, C, dtype, activation, use_residual):
    rows = 11                                   # two four-row passes and three single rows
    x = make_x(rng, (rows, C), dtype, axis=-1)
    r = rng.standard_normal((rows, C)).astype(dtype) if use_residual else None
    bn = _layer(rng, C, dtype, activation)
    bn.eval()
    y = bn(x, residual=r)
    for i in range(rows):
        one = bn(x[i:i + 1], residual=None if r is None else r[i:i + 1])
        assert bitwise_equal(one, y[i:i + 1]), f"row {i}"
    # And against the float64 reference.
    w, b = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    y_ref, _, _, _, _ = ref.functional_forward(
        x.astype(np.float64), w, b, bn.running_mean, bn.running_var, training=False, axis=-1)
    if r is not None:
        y_ref = y_ref + r.astype(np.float64)
    if activation == "relu":
        y_ref = np.maximum(y_ref, 0.0)
    assert_close(y, y_ref, dtype, "value", "eval")


@pytest.mark.parametrize("C,dtype", [(2048, np.float32), (683, np.float64)])
def test_wide_rows_thread_count_invariant(rng, C, dtype):
    x = make_x(rng, (37, C), dtype, axis=-1)
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = []
    for n in (1, 2, 3):
        bn = cpubn.BatchNorm(C, axis=-1, dtype=dtype)
        with cpubn.threads(n):
            y = bn(x)
            dx = bn.backward(dy)
        results.append((y, dx))
    for y, dx in results[1:]:
        assert bitwise_equal(y, results[0][0])
        assert bitwise_equal(dx, results[0][1])


# Wide rows take blocks of up to 64 rows (partition.pxd: MIN_BLOCK_ROWS, WIDE_BLOCK_ELEMS):
# several blocks, a partial last one, and rows too wide for 64 rows a block.
TALL_BLOCKS = [((200, 2500), np.float32), ((150, 4100), np.float32),
               ((100, 1500), np.float64), ((70, 9000), np.float32)]


@pytest.mark.parametrize("shape,dtype", TALL_BLOCKS,
                         ids=[f"{s[0]}x{s[1]}-{np.dtype(d).name}" for s, d in TALL_BLOCKS])
def test_tall_blocks_of_wide_rows(rng, shape, dtype):
    x = make_x(rng, shape, dtype, axis=-1, loc=50.0)
    dy = rng.standard_normal(shape).astype(dtype)

    def run():
        y, mean, invstd = cpubn.batch_norm_forward(x, training=True, axis=-1)
        dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, axis=-1)
        return y, mean, invstd, dx, dw, db

    with cpubn.threads(1):
        first = run()
    for n in (2, 5):
        with cpubn.threads(n):
            assert all(bitwise_equal(a, b) for a, b in zip(first, run())), n
    y, mean, invstd, dx, dw, db = first
    x64 = x.astype(np.float64)
    y_ref, mean_ref, invstd_ref, _, _ = ref.functional_forward(x64, axis=-1)
    dx_ref, dw_ref, db_ref = ref.backward(dy.astype(np.float64), x64, mean_ref, invstd_ref,
                                          axis=-1)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-6)
    assert_close(y, y_ref, dtype, "value", "forward")
    assert_close(dx, dx_ref, dtype, "grad", "dx")
    assert_close(db, db_ref, dtype, "grad", "dbias")
