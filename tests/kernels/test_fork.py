"""A child process made by fork() after the parent ran multi-threaded calls computes, on
one thread, the parent's results bit for bit, instead of waiting for ever for the
OpenMP worker threads that fork() left behind.  Each case runs in its own interpreter
under a timeout, so that a hang fails the test instead of the suite."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

# The parent: two-thread calls of every kind (small inputs take the parallel paths with
# the threshold lowered), then `CHILD` in a forked child, which must print the same digest.
PARENT = textwrap.dedent("""
    import hashlib, multiprocessing, os, sys
    import numpy as np
    import cpubn, cpubn._core.threads as threads

    threads.PARALLEL_MIN_ELEMENTS = 1 << 12
    cpubn.set_num_threads(2)
    x = np.random.default_rng(0).standard_normal((8, 32, 20, 20)).astype(np.float32)

    def digest():
        h = hashlib.sha256()
        for axis, data in ((1, x), (-1, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))):
            bn = cpubn.BatchNorm(32, axis=axis)
            for array in (bn(data), bn.backward(np.ones_like(data)), bn.running_var,
                          bn.eval()(data), bn.backward(data)):
                h.update(np.ascontiguousarray(array).tobytes())
            y, mean, invstd = cpubn.batch_norm_forward(data, training=True, axis=axis)
            h.update(y.tobytes() + mean.tobytes() + invstd.tobytes())
        return h.hexdigest()

    def threads_in_child(_):
        return cpubn.get_num_threads(), digest()

    parent = digest()
    assert threads.threads_for(x.size) == 2 and cpubn.get_num_threads() == 2
    {child}
""")

FORK = """
pid = os.fork()
if pid == 0:
    ok = digest() == parent and cpubn.get_num_threads() == 1
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert cpubn.get_num_threads() == 2          # the parent keeps its threads
print("ok")
"""

POOL = """
with multiprocessing.get_context("fork").Pool(2) as pool:
    results = pool.map(threads_in_child, range(2))
assert results == [(1, parent)] * 2, results
print("ok")
"""


@pytest.mark.parametrize("child", [FORK, POOL], ids=["os.fork", "multiprocessing-pool"])
def test_forked_child_computes_the_parents_bits(child, tmp_path):
    script = tmp_path / "fork_case.py"
    script.write_text(PARENT.replace("{child}", child))
    # A session of its own, so that a hung child is killed with its parent.
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the forked child hung in its first parallel call")
    assert process.returncode == 0, stderr
    assert stdout.strip() == "ok"
