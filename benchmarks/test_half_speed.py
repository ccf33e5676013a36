"""Half-precision data against float32 data (pytest-benchmark).

One benchmark group per (shape, layout, op), holding cpubn on the same values stored as
float32, float16 and bfloat16 (when ml_dtypes is installed), with float32 parameters,
at 1 thread and at all usable CPUs: the peers of ``python -m cpubn bench --half``
(``cpubn.bench.half``).  No timing is asserted: compare the group tables.

    pytest benchmarks/test_half_speed.py
"""

import numpy as np
import pytest

from cpubn._core.machine import usable_cpus
from cpubn.bench.half import HalfBuffers, cpubn_peer, half_dtypes
from cpubn.bench.harness import layouts_for, ops_for, shape_label

SHAPES = ((32, 64, 56, 56), (256, 1024))
DTYPES = tuple(d.name for d in half_dtypes())


THREADS = tuple(dict.fromkeys((1, usable_cpus())))


def _cases():
    for shape in SHAPES:
        for layout in layouts_for(shape, ("nchw", "nhwc")):
            for op in ops_for(shape):
                for threads in THREADS:
                    for dtype in DTYPES:
                        yield pytest.param(shape, layout, op, dtype, threads,
                                           id=f"{shape_label(shape)}-{layout}-{op}-{dtype}"
                                              f"-t{threads}")


@pytest.mark.parametrize("shape, layout, op, dtype, threads", list(_cases()))
def test_half_precision(benchmark, one_shape_buffers, shape, layout, op, dtype, threads):
    import cpubn

    buf = one_shape_buffers(("half", shape),
                            lambda: HalfBuffers(shape, half_dtypes(), np.random.default_rng(0)))
    fn = cpubn_peer(cpubn, buf, dtype, layout, op)
    benchmark.group = f"{shape_label(shape)} {layout} {op} (half precision)"
    benchmark.extra_info.update(threads=threads, dtype=dtype)
    with cpubn.threads(threads):
        result = benchmark(fn)
    out = result[0] if isinstance(result, tuple) else result
    assert out.dtype.name == dtype and out.size == buf.arrays[dtype]["x"].size
