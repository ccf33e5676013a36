"""Recycled memory for large results (cpubn._kernels.pool): an allocating call on a tensor of at
least 64 KiB reuses the memory of a result nothing refers to any more, and never memory
that something can still reach."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cpubn
from cpubn._core import dispatch as _dispatch
from cpubn._kernels import pool as _pool
import reference as ref
from bn_testing import assert_close, make_x

LARGE = (2, 8, 512, 256)          # 2M float32 values: 8 MiB...
assert np.prod(LARGE) * 8 >= _dispatch.POOL_MIN_BYTES     # ...16 MiB in float64


def _large(rng):
    return make_x(rng, LARGE, np.float64)


def test_a_dropped_result_is_reused_and_correct(rng):
    x = _large(rng)
    bn = cpubn.BatchNorm(8, dtype=np.float64).eval()
    y1 = bn(x)
    assert isinstance(y1.base, _pool.Block) and type(y1) is np.ndarray
    address = y1.ctypes.data
    y1[...] = np.nan                # whatever the user left in it
    del y1
    y2 = bn(x)
    assert y2.ctypes.data == address
    expected = ref.normalize(x, np.zeros(8), ref.invstd_of(np.ones(8), 1e-5),
                             np.ones(8), np.zeros(8))
    assert_close(y2, expected, np.float64)


@pytest.mark.parametrize("shape", [(64, 256), (256, 1024), (1024, 1024)])  # from the threshold up
def test_mid_sized_results_come_from_the_pool(rng, shape):
    """From 64 KiB (an MLP's activations) a result reuses mapped memory: a fresh
    allocation of that size pays a page fault per page, as much as the kernel's work."""
    x = make_x(rng, shape, np.float32)
    bn = cpubn.BatchNorm(shape[1])
    y = bn(x)
    assert isinstance(y.base, _pool.Block)
    address = y.ctypes.data
    del y
    assert bn(x).ctypes.data == address


def test_small_results_are_ordinary_arrays(rng):
    x = make_x(rng, (16, 128), np.float32)        # 8 KiB: malloc's own free lists serve it
    y = cpubn.BatchNorm(128)(x)
    assert y.base is None and y.flags.owndata


def test_memory_still_reachable_is_never_reused(rng):
    x = _large(rng)
    bn = cpubn.BatchNorm(8, dtype=np.float64)
    y1 = bn(x)
    view = y1[1, 3]                 # a view keeps the block alive
    kept = view.copy()
    del y1
    y2 = bn(x * 2.0)
    assert not np.shares_memory(y2, view)
    assert np.array_equal(view, kept)
    held = memoryview(y2)           # so does an exported buffer
    address = y2.ctypes.data
    del y2
    y3 = bn(x)
    assert y3.ctypes.data != address
    del held


def test_backward_results_come_from_the_pool_too(rng):
    x = _large(rng)
    bn = cpubn.BatchNorm(8, dtype=np.float64)
    y = bn(x)
    dy = rng.standard_normal(LARGE)
    dx = bn.backward(dy)
    assert isinstance(dx.base, _pool.Block)
    dx_ref, _, _ = ref.backward(dy, x, *_mean_invstd(x))
    assert_close(dx, dx_ref, np.float64, "grad")
    del y


def _mean_invstd(x):
    mean, var, _ = ref.batch_stats(x)
    return mean, ref.invstd_of(var, 1e-5)


def test_release_gives_unused_blocks_back(rng):
    x = _large(rng)
    bn = cpubn.BatchNorm(8, dtype=np.float64).eval()
    y = bn(x)
    nbytes = y.nbytes
    del y
    assert _pool.unused_pooled_bytes() >= nbytes
    assert cpubn.release_pooled_memory() >= nbytes
    assert _pool.unused_pooled_bytes() == 0


def test_pooled_arrays_behave_like_numpy_arrays(rng):
    import pickle
    a, fresh = _pool.empty((3, 4), np.float32)
    a[...] = np.arange(12).reshape(3, 4)
    assert a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32
    assert np.array_equal(pickle.loads(pickle.dumps(a)), a)
    with pytest.raises(ValueError):
        a.resize((13,))             # it does not own its memory: the pool does


def test_pool_limit_zero_turns_recycling_off():
    code = ("import numpy as np, cpubn\n"
            "from cpubn._kernels import pool as _pool\n"
            "assert _pool.pool_limit_bytes() == 0\n"
            "a, fresh = _pool.empty((1 << 22,), np.float64); del a\n"
            "assert _pool.unused_pooled_bytes() == 0\n"
            "b, fresh = _pool.empty((1 << 22,), np.float64)\n"
            "assert fresh\n")
    env = dict(os.environ, CPUBN_POOL_MIB="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


# A limit too large for a 64-bit byte count used to wrap to a zero limit, turning
# recycling off.
@pytest.mark.parametrize("value", ["lots", "-1", str(2**44)])
def test_bad_pool_limit_is_an_error(value):
    env = dict(os.environ, CPUBN_POOL_MIB=value)
    done = subprocess.run([sys.executable, "-c", "import cpubn"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "CPUBN_POOL_MIB" in done.stderr


def test_the_pool_keeps_at_most_its_limit():
    limit = _pool.pool_limit_bytes()
    blocks = [_pool.empty((1 << 20,), np.float64)[0] for _ in range(3)]
    del blocks
    assert _pool.unused_pooled_bytes() <= limit


def spy_stream_flags(monkeypatch):
    """Wrap the output kernels so that each call records the `stream` flag it is handed:
    kernel name -> the flags of its calls, in order."""
    from cpubn._kernels import backward as _backward, forward as _forward
    handed = {}

    def spy(module, name, index):
        kernel = getattr(module, name)

        def call(*args):
            handed.setdefault(name, []).append(args[index])
            return kernel(*args)
        monkeypatch.setattr(module, name, call)

    spy(_forward, "forward_train", 10)
    spy(_forward, "forward_eval", 12)
    spy(_backward, "backward", 11)
    return handed


@pytest.mark.parametrize("axis, streams", [(1, True), (-1, False)],
                         ids=["channels-first", "channels-last"])
def test_stores_streaming_only_in_channels_first_training_and_backward(rng, monkeypatch,
                                                                        axis, streams):
    # Channels-first outputs of STREAM_MIN_BYTES and more (16 MiB on a host whose last
    # cache level is at most 128 MiB) are written with streaming stores by the training
    # and backward kernels; eval, and channels-last rows, write them with ordinary stores
    # (measured faster there: cpubn/_core/dispatch.py: _output).  The results are the same
    # either way, so this checks the flag the kernels are handed.
    monkeypatch.setattr(_dispatch, "STREAM_MIN_BYTES", 16 << 20)
    handed = spy_stream_flags(monkeypatch)
    x = _large(rng)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    bn = cpubn.BatchNorm(8, dtype=np.float64, axis=axis)
    out = np.empty_like(x)
    bn(x, out=out)
    bn.backward(x, out=np.empty_like(x))
    bn.eval()
    bn(x, out=out)
    assert handed == {"forward_train": [streams], "backward": [streams],
                      "forward_eval": [False]}


def test_outputs_that_may_stay_in_the_last_level_cache_are_not_streamed(rng, monkeypatch):
    # Below STREAM_MIN_BYTES (an eighth of the last level, at least 16 MiB) the kernels
    # are handed ordinary stores, for out= and for recycled blocks alike.
    handed = spy_stream_flags(monkeypatch)
    x = _large(rng)                                            # 16 MiB
    bn = cpubn.BatchNorm(8, dtype=np.float64)
    monkeypatch.setattr(_dispatch, "STREAM_MIN_BYTES", x.nbytes + 1)
    bn(x, out=np.empty_like(x))
    y = bn(x)                                                  # pooled (fresh or recycled)
    del y
    bn(x)                                                      # the block just returned
    monkeypatch.setattr(_dispatch, "STREAM_MIN_BYTES", x.nbytes)
    bn(x, out=np.empty_like(x))
    assert handed == {"forward_train": [False, False, False, True]}


def test_stream_threshold_follows_the_last_level_cache():
    assert _dispatch.stream_min_bytes(0) == 16 << 20           # unknown: the fixed default
    assert _dispatch.stream_min_bytes(32 << 20) == 16 << 20
    assert _dispatch.stream_min_bytes(480 << 20) == 60 << 20


RSS_SCRIPT = """
import numpy as np
from cpubn._kernels import pool

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")

# Freeing one large NumPy array raises glibc's mmap threshold above the blocks' size:
# malloc'ed blocks then come from the heap, and free() keeps their pages.
big = np.ones((30 << 20) // 8)
del big
blocks = [pool.empty((24 << 20,), np.uint8)[0] for _ in range(8)]
for block in blocks:
    block.fill(1)                       # every page touched
# A small array allocated after them and kept: on the heap, it stops free() from trimming
# the blocks below it off the heap's top.
kept = np.ones((1 << 20) // 8)
del blocks, block
before = rss()
released = pool.release_pooled_memory()
after = rss()
print(released, before - after)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.skipif(os.environ.get("CPUBN_SANITIZED") == "1",
                    reason="the sanitizer's allocator changes what RSS measures")
def test_released_memory_leaves_the_process():
    """release_pooled_memory() gives its blocks back to the system, measured by RSS (not
    by the count it returns)."""
    env = dict(os.environ, CPUBN_POOL_MIB="1024")
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT], env=env, capture_output=True,
                          text=True, check=True)
    released, rss_drop = map(int, done.stdout.split())
    assert released == 8 * (24 << 20)
    assert rss_drop >= 0.9 * released, (released, rss_drop)
