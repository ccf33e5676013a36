"""Timed comparison of cpubn with plain NumPy and PyTorch (pytest-benchmark).

One benchmark group per (shape, layout, op), holding the copy roofline, cpubn
(``out=`` and allocating) and torch at each thread count, and NumPy once (it
runs on one thread anyway). The peers are the ones of ``python -m cpubn bench``
(``cpubn.bench.peers.build_peers``). No timing is asserted: compare the group tables.

    pytest benchmarks                              # timed, a few minutes on 2 cores
    pytest benchmarks --benchmark-disable          # each function once, seconds
    pytest benchmarks -k "nhwc and train" --benchmark-columns=median,ops
"""

import numpy as np
import pytest

from cpubn._core.machine import usable_cpus
from cpubn.bench.harness import bytes_moved, layout_shape, layouts_for, ops_for, shape_label

# A representative subset of the command's shape sets (NCHW notation): a ResNet
# stage, the deep low-resolution stage that favours row-streaming kernels, and three
# fully connected (N, C) inputs of the MLP grid (bench --mlp): few rows of many
# features, a mid-sized batch, a large one.
SHAPES = ((32, 64, 56, 56), (32, 2048, 7, 7), (256, 1024), (64, 4096), (1024, 1024),
          (4096, 512))


THREADS = tuple(dict.fromkeys((1, usable_cpus())))


def _cases():
    for shape in SHAPES:
        for layout in layouts_for(shape, ("nchw", "nhwc")):
            for op in ops_for(shape):
                for threads in THREADS:
                    for peer in ("copy", "cpubn_out", "cpubn", "torch"):
                        yield pytest.param(shape, layout, op, peer, threads,
                                           id=f"{shape_label(shape)}-{layout}-{op}-{peer}-t{threads}")
                yield pytest.param(shape, layout, op, "numpy", 1,
                                   id=f"{shape_label(shape)}-{layout}-{op}-numpy")


@pytest.mark.parametrize("shape, layout, op, peer, threads", list(_cases()))
def test_batch_norm(benchmark, bench_buffers, torch_or_none, torch_threads,
                    shape, layout, op, peer, threads):
    import cpubn
    from cpubn.bench.harness import copy_function
    from cpubn.bench.peers import build_peers

    if peer == "torch" and torch_or_none is None:
        pytest.skip("torch is not installed")
    buf = bench_buffers(shape)
    torch_threads(threads)
    fns, errors = build_peers(cpubn, torch_or_none, copy_function(), buf, layout, op,
                              threads, names=(peer,))
    assert not errors, errors
    benchmark.group = f"{shape_label(shape)} {layout} {op}"
    benchmark.extra_info.update(threads=threads, bytes_moved=bytes_moved(op, buf.nbytes))
    with cpubn.threads(threads):
        result = benchmark(fns[peer])

    if peer != "copy":  # a cheap sanity check that the benchmarked call did the work
        first = result[0] if isinstance(result, tuple) else result  # torch forward: a tensor
        out = np.asarray(first)
        assert out.shape[0] == shape[0] and out.size == buf.x.size
        assert out.dtype == np.float32
        if peer != "torch":
            assert out.shape == layout_shape(shape, layout)
