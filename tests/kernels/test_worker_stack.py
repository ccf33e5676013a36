"""Kernels run on OpenMP worker threads with small stacks (STYLE.md 14).

musl's default thread stack is 128 KiB and OMP_STACKSIZE can make it smaller; the
half-precision tiles (up to 136 KiB) and the streaming buffer therefore live in heap
scratch that each call allocates before its parallel regions.  These tests run the
paths that used them on 2 threads whose stacks are 48 KiB (a subprocess, since the
OpenMP runtime reads OMP_STACKSIZE once) and compare with the results computed here.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import cpubn, cpubn._core.threads
from worker_stack_cases import run_all
cpubn._core.threads.PARALLEL_MIN_ELEMENTS = 1 << 12
np.savez(sys.argv[1], **run_all())
"""


@pytest.mark.parametrize("portable", ["0", "1"], ids=["vector-half", "portable-half"])
def test_small_worker_stacks(tmp_path, portable):
    pytest.importorskip("ml_dtypes")
    import cpubn
    if not cpubn.openmp_enabled():
        pytest.skip("serial build: no worker threads")
    from worker_stack_cases import run_all
    path = tmp_path / "out.npz"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_STACKSIZE="48K", CPUBN_PORTABLE_HALF=portable)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), here], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if portable == "0":     # the same process settings as this one: compare the bits
        expected = run_all()
        with np.load(path) as small:
            assert set(small.files) == set(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(small[key], value, err_msg=key)
