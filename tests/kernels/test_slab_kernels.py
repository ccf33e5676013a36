"""The short-run (slab) kernels: channels-first maps of at most 1024 values (7x7, 14x14,
28x28) take src/cpubn/_kernels/c/loops_slab.h.tp's loops, a slab of batch items x channels per call.

Checked against the float64 reference in both geometries the partition picks (slabs of
whole channels, and batch tiles merged per channel), at the boundary run length, with
large offsets, for thread-count invariance, for the statistics-only entry point giving
the training forward's bits, for half-precision data giving float32's bits, and with
the fused ReLU / residual epilogue.
"""
import numpy as np
import pytest

import cpubn
from bn_testing import assert_close, bitwise_equal, make_x
from cpubn._kernels import backward as _backward, forward as _forward
import reference as ref

try:
    import ml_dtypes
    HALF = [np.float16, ml_dtypes.bfloat16]
except ImportError:  # pragma: no cover - the test extra installs it
    HALF = [np.float16]

# (shape, why): every one takes the slab kernels (the run length is at most 1024).
SLAB_SHAPES = [
    ((6, 70, 7, 7), "whole-channel slabs, C not a multiple of the slab width"),
    ((3, 33, 14, 14), "14x14"),
    ((700, 9, 7, 7), "several batch tiles, the last one short"),
    ((4000, 3, 2), "two values per run, few channels"),
    ((5, 4, 32, 32), "run length 1024, the longest slab run"),
    ((2, 5, 1, 3), "runs shorter than a vector"),
]


def _layer_pass(x, dy, dtype, n_threads, training=True):
    bn = cpubn.BatchNorm(x.shape[1], dtype=dtype)
    rng = np.random.default_rng(7)
    bn.weight[...] = rng.uniform(0.5, 1.5, x.shape[1])
    bn.bias[...] = rng.uniform(-1, 1, x.shape[1])
    bn.train(training)
    with cpubn.threads(n_threads):
        y = bn(x)
        dx = bn.backward(dy)
    return bn, y, dx


@pytest.mark.parametrize("shape,why", SLAB_SHAPES, ids=[s[1] for s in SLAB_SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slab_forward_backward_against_reference(rng, shape, why, dtype):
    x = make_x(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    bn, y, dx = _layer_pass(x, dy, dtype, 2)
    w, b = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    y_ref, mean, invstd, rm, rv = ref.functional_forward(
        x.astype(np.float64), w, b, np.zeros(shape[1]), np.ones(shape[1]), training=True)
    assert_close(y, y_ref, dtype, "value", why)
    assert_close(bn.running_mean, rm, dtype, "stat", why)
    assert_close(bn.running_var, rv, dtype, "stat", why)
    dx_ref, dw_ref, db_ref = ref.backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                          invstd, w)
    assert_close(dx, dx_ref, dtype, "grad", why)
    assert_close(bn.grad_weight, dw_ref, dtype, "grad", why)
    assert_close(bn.grad_bias, db_ref, dtype, "grad", why)


@pytest.mark.parametrize("shape,why", SLAB_SHAPES, ids=[s[1] for s in SLAB_SHAPES])
def test_slab_eval_backward_against_reference(rng, shape, why):
    x = make_x(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn, y, dx = _layer_pass(x, dy, np.float32, 2, training=False)
    w = bn.weight.astype(np.float64)
    dx_ref, dw_ref, db_ref = ref.backward(dy.astype(np.float64), x.astype(np.float64),
                                          np.zeros(shape[1]), ref.invstd_of(np.ones(shape[1]),
                                                                            1e-5),
                                          w, training=False)
    assert_close(dx, dx_ref, np.float32, "grad", why)
    assert_close(bn.grad_weight, dw_ref, np.float32, "grad", why)
    assert_close(bn.grad_bias, db_ref, np.float32, "grad", why)


@pytest.mark.parametrize("shape", [(6, 70, 7, 7), (700, 9, 7, 7)])
def test_slab_large_offset(rng, shape):
    # Channels 1e4 away from zero with unit spread: the pivots keep the deviations exact.
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    bn, y, dx = _layer_pass(x, dy, np.float32, 2)
    mean, var, _ = ref.batch_stats(x.astype(np.float64))
    y_ref = ref.normalize(x.astype(np.float64), mean, ref.invstd_of(var, 1e-5),
                          bn.weight.astype(np.float64), bn.bias.astype(np.float64))
    assert np.abs(y - y_ref).max() <= 1e-5 * max(1.0, np.abs(y_ref).max())
    dx_ref, _, _ = ref.backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                ref.invstd_of(var, 1e-5), bn.weight.astype(np.float64))
    assert_close(dx, dx_ref, np.float32, "grad")


def test_constant_channels_give_the_bias(rng):
    x = np.repeat(rng.uniform(-5, 5, (1, 40, 1, 1)), 9, axis=0) * np.ones((9, 40, 7, 7))
    x = x.astype(np.float32)
    bn = cpubn.BatchNorm(40)
    bn.bias[...] = rng.uniform(-1, 1, 40)
    y = bn(x)
    assert np.array_equal(y, np.broadcast_to(bn.bias.reshape(1, 40, 1, 1), x.shape))


@pytest.mark.parametrize("shape,why", SLAB_SHAPES, ids=[s[1] for s in SLAB_SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slab_results_do_not_depend_on_the_thread_count(rng, shape, why, dtype):
    x = make_x(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = [_layer_pass(x, dy, dtype, n) for n in (1, 2, 3)]
    for bn, y, dx in results[1:]:
        assert bitwise_equal(y, results[0][1]), why
        assert bitwise_equal(dx, results[0][2]), why
        assert bitwise_equal(bn.running_var, results[0][0].running_var), why
        assert bitwise_equal(bn.grad_weight, results[0][0].grad_weight), why


@pytest.mark.parametrize("shape,why", SLAB_SHAPES, ids=[s[1] for s in SLAB_SHAPES])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_batch_stats_entry_gives_the_training_forwards_bits(rng, shape, why, n_threads):
    x = make_x(rng, shape, np.float32)
    N, C, S = shape[0], shape[1], int(np.prod(shape[2:]))
    trained, alone = np.empty(3 * C), np.empty(3 * C)
    _forward.forward_train(x, np.empty_like(x), None, None, 1e-5, trained, N, C, S,
                           n_threads, False)
    _forward.batch_stats(x, 1e-5, alone, N, C, S, n_threads)
    assert bitwise_equal(trained, alone), why


@pytest.mark.parametrize("half", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(6, 70, 7, 7), (700, 9, 7, 7), (5, 4, 32, 32)])
def test_half_slabs_give_float32_bits(rng, half, shape):
    # Half data is computed as float32 data of the same values, rounded once.
    x16 = make_x(rng, shape, np.float32).astype(half)
    dy16 = rng.standard_normal(shape).astype(half)
    x32, dy32 = x16.astype(np.float32), dy16.astype(np.float32)
    bn16, y16, dx16 = _layer_pass(x16, dy16, np.float32, 2)
    bn32, y32, dx32 = _layer_pass(x32, dy32, np.float32, 2)
    assert bitwise_equal(y16, y32.astype(half))
    assert bitwise_equal(dx16, dx32.astype(half))
    assert bitwise_equal(bn16.running_var, bn32.running_var)
    assert bitwise_equal(bn16.grad_weight, bn32.grad_weight)


@pytest.mark.parametrize("shape", [(6, 70, 7, 7), (700, 9, 7, 7)])
def test_slab_fused_relu_residual(rng, shape):
    x = make_x(rng, shape, np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    fused = cpubn.BatchNorm(shape[1], activation="relu")
    plain = cpubn.BatchNorm(shape[1])
    y = fused(x, residual=r)
    z = plain(x) + r
    assert bitwise_equal(y, np.maximum(z, 0))
    dx, dres = fused.backward(dy)
    g = np.where(z > 0, dy, 0).astype(np.float32)
    assert bitwise_equal(dres, g)
    assert bitwise_equal(dx, plain.backward(g))


# Maps whose normalization takes slab_normalize's pieces (a batch item's runs of up to
# 16384 // S channels): more channels than one piece, fewer, one run per piece, batch 1.
PIECE_SHAPES = [(4, 400, 7, 7), (3, 33, 14, 14), (2, 5, 1, 3), (2, 3, 32, 32), (1, 90, 14, 14)]


@pytest.mark.parametrize("shape", PIECE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF,
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation,use_residual", [(None, False), ("relu", False),
                                                     ("relu", True)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_slab_eval_gives_the_channels_last_bits(rng, shape, dtype, activation, use_residual,
                                                n_threads):
    # Eval is the same element-wise arithmetic in both layouts, computed by independent
    # loops (the channels-first pieces, the channels-last rows): the bits must agree, in
    # place too.
    C = shape[1]
    x = make_x(rng, shape, dtype)
    r = rng.standard_normal(shape).astype(dtype) if use_residual else None
    first = cpubn.BatchNorm(C, activation=activation)
    first.weight[...] = rng.uniform(0.5, 1.5, C)
    first.bias[...] = rng.uniform(-1, 1, C)
    first.running_mean[...] = rng.uniform(-1, 1, C)
    first.running_var[...] = rng.uniform(0.5, 2.0, C)
    first.eval()
    last = cpubn.BatchNorm(C, axis=-1, activation=activation)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(last, name)[...] = getattr(first, name)
    last.eval()
    to_last = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))
    with cpubn.threads(n_threads):
        y = first(x, residual=r)
        y_last = last(to_last(x), residual=None if r is None else to_last(r))
        x_in = x.copy()
        first(x_in, out=x_in, residual=r)
    assert bitwise_equal(to_last(y), y_last)
    assert bitwise_equal(x_in, y)


def test_slab_boundary_run_lengths_agree_with_the_reference(rng):
    # 1024 takes the slab kernels, 1025 the per-run ones: both against the reference.
    for S in (1024, 1025):
        x = make_x(rng, (3, 5, S), np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        bn, y, dx = _layer_pass(x, dy, np.float32, 2)
        mean, var, _ = ref.batch_stats(x.astype(np.float64))
        invstd = ref.invstd_of(var, 1e-5)
        w, b = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
        assert_close(y, ref.normalize(x.astype(np.float64), mean, invstd, w, b), np.float32)
        assert_close(dx, ref.backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                      invstd, w)[0], np.float32, "grad")


def test_slab_backward_checks_its_buffers():
    # The C boundary: a dx of the wrong size is refused before any loop runs.
    x = np.ones((4, 8, 7, 7), np.float32)
    stats = np.zeros(2 * 8)
    with pytest.raises(ValueError, match="dx has"):
        _backward.backward(x, x, np.empty(10, np.float32), stats, None, True, np.empty(16),
                           4, 8, 49, 1, False)
