"""Channels-last gradient sums of float data: groups of 8 rows summed in float32.

The backward's per-channel sums sum(dy) and sum(dy * (x - mean)) over channels-last rows
(and plain (N, C) inputs) add each group of 8 rows in float32, channel tile by channel
tile, against float pivots (the mean rounded to float32), then accumulate in float64
(src/cpubn/_kernels/c/loops_float.h.tp: rows_grad_sums; src/cpubn/_kernels/c/loops.h:
rows_grad_pivots). The half-precision loops do the same over converted tiles. These tests
check:

- accuracy against the float64 reference at large offsets, for channel counts with and
  without a partial channel tile and row counts that cut a group;
- that a float32 group holds 8 rows: data that loses every addition after the first row
  in float32 loses only the first group's;
- the fused ReLU backward's sums: bitwise those of the plain backward of the masked dy;
- thread-count invariance.
"""
import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import assert_close

# (N, H, W, C): C with no partial tile (32), a partial one (6, 70), several tiles and a
# wide row (1100 > 1024: the input gradient's four-row walk); N*H*W not a multiple of 8.
SHAPES = [(3, 7, 11, 6), (3, 7, 11, 70), (16, 8, 8, 32), (5, 3, 3, 1100)]


def _offset_data(rng, shape, offset=1e4):
    C = shape[-1]
    centres = offset * rng.uniform(-1, 1, C)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0, C) + centres).astype(np.float32)
    dy = (rng.standard_normal(shape) + 0.5).astype(np.float32)     # sum(dy) far from 0
    return x, dy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_grad_sums_at_large_offsets_match_reference(shape, n_threads, rng):
    x, dy = _offset_data(rng, shape)
    with cpubn.threads(n_threads):
        _, mean, invstd = cpubn.batch_norm_forward(x, training=True, axis=-1)
        dx, dw, db = cpubn.batch_norm_backward(dy, x, mean, invstd, training=True, axis=-1)
    ref_mean, var, _ = ref.batch_stats(x, -1)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, ref_mean, ref.invstd_of(var, 1e-5),
                                          training=True, axis=-1)
    assert_close(dx, dx_ref, np.float32, "grad", "dx")
    assert_close(dw, dw_ref, np.float32, "grad", "dweight")
    assert_close(db, db_ref, np.float32, "grad", "dbias")


@pytest.mark.parametrize("C", [6, 70])
def test_float32_group_sums_lose_at_most_one_group(C):
    # Row 0 of dy holds 2^24 and every other row 1.0: in float32, 2^24 + 1 rounds back to
    # 2^24.  The group of rows 0-7 therefore loses its seven ones, and every other group
    # of 8 adds exactly: sum(dy) comes out 7 short.  A float32 accumulation over all the
    # rows would lose every one (rows - 1 short); float64 throughout loses none.
    # (batch_norm_backward returns float32 grads for float32 data.)
    rows = 1024
    dy = np.ones((16, 8, 8, C), np.float32)
    dy.reshape(rows, C)[0] = 2.0 ** 24
    x = np.random.default_rng(0).standard_normal(dy.shape).astype(np.float32)
    _, mean, invstd = cpubn.batch_norm_forward(x, training=True, axis=-1)
    _, _, db = cpubn.batch_norm_backward(dy, x, mean, invstd, training=True, axis=-1)
    exact = 2.0 ** 24 + (rows - 1)
    error = db.astype(np.float64) - exact      # db is float32: 1 more for its rounding
    assert np.all(np.abs(error) <= 7 + 1), error



@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grad_sums_do_not_depend_on_the_thread_count(shape, rng):
    x, dy = _offset_data(rng, shape, offset=10.0)
    results = []
    for n_threads in (1, 2):
        bn = cpubn.BatchNorm(shape[-1], axis=-1)
        with cpubn.threads(n_threads):
            bn(x)
            dx = bn.backward(dy)
        results.append((dx, bn.grad_weight.copy(), bn.grad_bias.copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_relu_backward_sums_are_the_plain_sums_of_the_masked_gradient(shape, rng):
    x, dy = _offset_data(rng, shape, offset=1.0)
    fused = cpubn.BatchNorm(shape[-1], axis=-1, activation="relu")
    y = fused(x)
    dx_fused = fused.backward(dy)
    plain = cpubn.BatchNorm(shape[-1], axis=-1)
    plain(x)
    dx_plain = plain.backward(np.where(y <= 0, np.float32(0), dy))
    np.testing.assert_array_equal(dx_fused.view(np.uint32), dx_plain.view(np.uint32))
    np.testing.assert_array_equal(fused.grad_weight, plain.grad_weight)
    np.testing.assert_array_equal(fused.grad_bias, plain.grad_bias)
