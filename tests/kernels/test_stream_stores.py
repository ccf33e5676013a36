"""Streaming (non-temporal) stores are a way of writing, never a way of computing.

The public API decides when to stream (cpubn/_core/dispatch.py: _output: channels-first
training and backward outputs of 16 MiB and more); the compiled kernels take the choice
as an argument, for every layout.  Here they are called directly, both ways, on sizes
that reach each streaming branch (runs longer than the streaming buffer, channels-last
blocks of several rows per buffer, rows wider than the buffer), and must give the same
bits, close to the float64 reference.
"""
import numpy as np
import pytest

import reference as ref
from bn_testing import assert_close, bitwise_equal
from cpubn._kernels import backward as _backward, forward as _forward

CASES = [
    ((4, 3, 5000), "channels-first runs longer than the buffer"),
    ((6, 3, 1024), "channels-first slab runs of 4 KiB"),
    ((600, 64, 1), "channels-last, 32 rows per buffer"),
    ((40, 3000, 1), "channels-last rows wider than the buffer"),
]


def _kernel_pass(x, dy, weight, bias, dims, n_threads, stream, relu):
    N, C, S = dims
    y = np.empty_like(x)
    stats = np.empty(3 * C)
    _forward.forward_train(x, y, weight, bias, 1e-5, stats, N, C, S, n_threads, stream,
                           None, relu)
    dx = np.empty_like(x)
    grads = np.empty(2 * C)
    _backward.backward(dy, x, dx, stats, weight, True, grads, N, C, S, n_threads, stream,
                       y if relu else None, None)
    return y, stats, dx, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dims, why", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_streaming_gives_the_ordinary_bits(rng, dtype, dims, why, n_threads, relu):
    N, C, S = dims
    x = (rng.standard_normal(N * C * S) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(N * C * S).astype(dtype)
    weight = (rng.random(C) + 0.5).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    ordinary = _kernel_pass(x, dy, weight, bias, dims, n_threads, False, relu)
    streamed = _kernel_pass(x, dy, weight, bias, dims, n_threads, True, relu)
    for a, b in zip(ordinary, streamed):
        assert bitwise_equal(a, b), why
    if relu:
        return
    # Both ways agree with the float64 reference (so they are not both wrong).
    x3 = x.astype(np.float64).reshape(N, C, S)
    mean, var, _ = ref.batch_stats(x3)
    invstd = ref.invstd_of(var, 1e-5)
    y_ref = ref.normalize(x3, mean, invstd, weight.astype(np.float64), bias.astype(np.float64))
    assert_close(ordinary[0].reshape(N, C, S), y_ref, dtype, what=why)
    dx_ref = ref.backward(dy.astype(np.float64).reshape(N, C, S), x3, mean, invstd,
                          weight.astype(np.float64))[0]
    assert_close(ordinary[2].reshape(N, C, S), dx_ref, dtype, kind="grad", what=why)
