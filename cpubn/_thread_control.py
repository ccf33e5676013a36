"""The one place that decides how many threads a kernel call uses.

`None` means automatic: the OpenMP runtime's default, which honours OMP_NUM_THREADS and
threadpoolctl's limits.  A positive count is used as is; a negative one counts back from
the number of CPUs (-1 = all of them, -2 = all but one); 0 is an error.  Calls on small
arrays run on one thread whatever the setting: forking a team costs more than it saves.
"""
import contextlib
import operator
import os

from . import _threads

# Below this many elements a kernel call runs serially.  A second thread saves at most a
# few tens of microseconds here, but on a busy machine a team member that is not
# scheduled stalls the whole call for a scheduler slice (milliseconds).
PARALLEL_MIN_ELEMENTS = 1 << 17

_requested = None   # what set_num_threads asked for; None = automatic


def _resolve(n_threads):
    if n_threads is None:
        return None
    if isinstance(n_threads, bool):
        raise TypeError(f"the number of threads must be an int or None, got {n_threads!r}")
    try:
        n_threads = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"the number of threads must be an int or None, "
                        f"got {n_threads!r}") from None
    if n_threads == 0:
        raise ValueError("the number of threads must be non-zero, got 0 (None = automatic, "
                         "negative = count back from the number of CPUs)")
    if n_threads < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_threads)
    return n_threads


def set_num_threads(n_threads):
    """Set the threads cpubn's kernels use: an int > 0, a negative int counting back from
    the CPU count (-1 = all CPUs), or None for automatic (OMP_NUM_THREADS / threadpoolctl).
    """
    global _requested
    _requested = _resolve(n_threads)


def get_num_threads():
    """The number of threads a large kernel call will use now."""
    if _requested is not None:
        return _requested
    return max(1, _threads.omp_max_threads())


@contextlib.contextmanager
def threads(n_threads):
    """Context manager: `with cpubn.threads(4): ...` runs the block's calls on 4 threads and
    restores the previous setting on exit.  (Process-wide, like torch.set_num_threads.)"""
    global _requested
    resolved = _resolve(n_threads)
    previous = _requested
    _requested = resolved
    try:
        yield
    finally:
        _requested = previous


def threads_for(n_elements):
    """Threads for one kernel call over n_elements: 1 below the parallel threshold."""
    if n_elements < PARALLEL_MIN_ELEMENTS:
        return 1
    return get_num_threads()


def openmp_enabled():
    """True if this build has OpenMP (multi-threaded kernels); False for a serial build."""
    return _threads.openmp_enabled()
