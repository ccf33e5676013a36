"""Fixtures for the pytest-benchmark suite (``pytest benchmarks``).

A plain ``pytest`` (the test command) runs these benchmarks once each, untimed.

Every benchmark of one shape reads the same arrays (built once per shape and
dtype), the ones ``python -m cpubn bench`` uses, so the suite and the command
measure the same thing. With ``--benchmark-disable`` each benchmark runs its
function once: the suite then only checks that every peer still runs.
"""

import pathlib

import numpy as np
import pytest

BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Time benchmarks only when the run targets benchmarks/ alone (`pytest benchmarks`).
    The plain `pytest` of the test command collects them too, but only runs each once,
    as with --benchmark-disable, so CI checks they work without spending minutes timing."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or config.getoption("benchmark_enable", False):
        return
    targets = [pathlib.Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    if not all(target == BENCHMARKS_DIR or BENCHMARKS_DIR in target.parents
               for target in targets):
        session.disabled = True

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # keep `pytest` usable without the optional plugin
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark)")


@pytest.fixture(scope="session")
def one_shape_buffers():
    """key, build -> build(), kept until another key is asked for: one shape's arrays at a
    time keeps memory small (benchmarks are ordered by shape)."""
    cache = {}

    def get(key, build):
        if key not in cache:
            cache.clear()
            cache[key] = build()
        return cache[key]

    return get


@pytest.fixture(scope="session")
def bench_buffers(one_shape_buffers):
    """shape, dtype -> cpubn.bench.peers.BenchBuffers (the arrays of python -m cpubn bench)."""
    from cpubn.bench.peers import BenchBuffers

    def get(shape, dtype=np.float32):
        return one_shape_buffers(
            ("bench", tuple(shape), np.dtype(dtype).name),
            lambda: BenchBuffers(shape, dtype, np.random.default_rng(0)))

    return get


@pytest.fixture(scope="session")
def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture
def torch_threads(torch_or_none):
    """Call with n to set torch's thread count for this test; restored afterwards."""
    torch = torch_or_none
    saved = torch.get_num_threads() if torch is not None else None

    def set_threads(n):
        if torch is not None:
            torch.set_num_threads(n)

    yield set_threads
    if torch is not None:
        torch.set_num_threads(saved)
