"""Fused BN+ReLU and BN+residual+ReLU against BN alone and the unfused sequence
(pytest-benchmark).

One benchmark group per (shape, layout, op), holding cpubn's peers of
``python -m cpubn bench --fused`` (``cpubn.bench.fused``): BN alone into ``out=``, the
fused forms, and cpubn's BN followed by NumPy's in-place add / maximum, at 1 thread and
at all usable CPUs.  No timing is asserted: compare the group tables.

    pytest benchmarks/test_fused_speed.py
"""

import numpy as np
import pytest

from cpubn._core.machine import usable_cpus
from cpubn.bench.fused import OPS, FusedBuffers, cpubn_peers
from cpubn.bench.harness import layouts_for, ops_for, shape_label

SHAPES = ((32, 64, 56, 56), (32, 2048, 7, 7))
PEERS = ("bn", "fused", "fused+res", "unfused", "unfused+res")
THREADS = tuple(dict.fromkeys((1, usable_cpus())))


def _cases():
    for shape in SHAPES:
        for layout in layouts_for(shape, ("nchw", "nhwc")):
            for op in ops_for(shape, OPS):
                for threads in THREADS:
                    for peer in PEERS:
                        yield pytest.param(shape, layout, op, peer, threads,
                                           id=f"{shape_label(shape)}-{layout}-{op}-{peer}"
                                              f"-t{threads}")


@pytest.mark.parametrize("shape, layout, op, peer, threads", list(_cases()))
def test_fused(benchmark, one_shape_buffers, shape, layout, op, peer, threads):
    import cpubn

    buf = one_shape_buffers(("fused", shape),
                            lambda: FusedBuffers(shape, np.float32, np.random.default_rng(0)))
    fn = cpubn_peers(cpubn, buf, layout, op)[peer]
    benchmark.group = f"{shape_label(shape)} {layout} {op} (fused)"
    benchmark.extra_info.update(threads=threads)
    with cpubn.threads(threads):
        result = benchmark(fn)
    out = result[0] if isinstance(result, tuple) else result
    assert out.dtype == np.float32 and out.size == buf.x.size
