"""The one place that decides how many threads a kernel call uses.

`None` means automatic: the OpenMP runtime's default (which honours OMP_NUM_THREADS and
threadpoolctl's limits), capped, unless OMP_NUM_THREADS is set, at the CPUs this process
may actually use (its affinity mask and its cgroup CPU quota: a container limited to 2
CPUs on a 64-core host gets 2), and always at MAX_THREADS.
A positive count is used as is, up to MAX_THREADS; a negative one counts back from the
usable CPUs (-1 = all of them, -2 = all but one); 0 is an error.  Calls on small arrays
run on one thread whatever the setting: forking a team costs more than it saves.

set_num_threads is process-wide; the `threads()` context manager overrides it for the
calling Python thread only, so threads that nest it in any interleaving each get and
restore their own setting.

A child process made by fork() (os.fork, multiprocessing's 'fork' context, a Pool, joblib
or data-loader workers) runs every call on one thread, whatever the setting: see
_after_fork_in_child.
"""
import contextlib
import operator
import os
import platform
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import SupportsIndex

from . import machine


# How long (in iterations of a pause loop) the OpenMP runtime's threads spin waiting for
# work before they sleep (libgomp's GOMP_SPINCOUNT).  Long enough to cover the gap between
# the parallel regions of one call and between back-to-back calls; short enough that an
# idle team gives its cores back after a fraction of a millisecond.
SPIN_COUNT = 30000


def _load_openmp_runtime() -> ModuleType:
    """Import the compiled runtime module, and with it the OpenMP runtime, with threads
    that spin briefly and then sleep when they wait (GOMP_SPINCOUNT=SPIN_COUNT; for LLVM's
    runtime KMP_BLOCKTIME=1, its shortest spin in milliseconds but one).

    A thread that sleeps at once (OMP_WAIT_POLICY=passive) must be woken for every
    parallel region, and on a virtual machine a wake-up costs about as much as a whole
    mid-sized call, which then runs slower on two threads than on one.  A thread that
    spins for ever (OMP_WAIT_POLICY=active, or the runtimes' defaults of hundreds of
    milliseconds) holds its core long after the call, against a neighbour or the BLAS
    threads of the next matrix product.  A bounded spin keeps the team awake through a
    call and between close calls, and then sleeps.  The runtime reads the variables once,
    when it is loaded; they are removed again right after, so child processes and other
    libraries' runtimes do not see them.  A user's own OMP_WAIT_POLICY, GOMP_SPINCOUNT or
    KMP_BLOCKTIME wins; a runtime that something else loaded first keeps its own."""
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    if any(name in os.environ for name in names):
        from .._kernels import runtime
        return runtime
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    os.environ["KMP_BLOCKTIME"] = "1"
    try:
        from .._kernels import runtime
    finally:
        del os.environ["GOMP_SPINCOUNT"], os.environ["KMP_BLOCKTIME"]
    return runtime


# Loaded before any kernel module (cpubn._core.dispatch imports this module first).
_runtime = _load_openmp_runtime()

# True in a child made by fork(): see _after_fork_in_child.
_forked_child = False


def _after_fork_in_child() -> None:
    """Run every call of a forked child on one thread.

    fork() copies only the calling thread: the OpenMP runtime's worker threads stay in
    the parent, but the runtime's state in the child still counts them, and the child's
    first parallel region of two or more threads waits for them for ever.  No runtime API
    rebuilds that state, so the child never starts a team: a one-thread call takes no
    worker, and its results are the parent's, bit for bit, since they never depend on the
    thread count."""
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):        # POSIX; elsewhere there is no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)

# Below this many elements a kernel call runs on one thread: with the team kept awake by
# SPIN_COUNT, a second thread pays for its fork and join from about this size on.
PARALLEL_MIN_ELEMENTS = 1 << 17

# An eval forward is one light pass over the data (a multiply-add per element), so the
# fork and join weigh more against its work: it runs on one thread below this many
# times PARALLEL_MIN_ELEMENTS.
EVAL_PARALLEL_FACTOR = 1.5

# After a parallel call, its team's workers spin (SPIN_COUNT) and count as running tasks
# in the machine's run queue, where they would look like a busy neighbour to the next
# call.  For this long after a call they are known to be still spinning, and are not
# counted.  It must stay below the spin's length, or a worker that has gone to sleep
# would hide a neighbour: on x86-64 a pause instruction bounds the spin from below on
# every CPU; elsewhere the runtime's spin loop may be much shorter, so none is trusted.
TEAM_SPIN_SECONDS = 150e-6 if platform.machine().lower() in ("x86_64", "amd64") else 0.0

# The largest explicit thread count accepted.  Asking the OpenMP runtime for more threads
# than the system can create ends the process (libgomp prints "Thread creation failed"
# and exits), which no Python code can catch; far fewer than this are ever useful.
MAX_THREADS = 256

_requested: int | None = None  # what set_num_threads asked for; None = automatic
_local = threading.local()     # per-Python-thread override set by threads()
# An explicit OMP_NUM_THREADS is the user's choice (oversubscription included) and is
# honoured up to MAX_THREADS; otherwise the runtime's default is capped at machine.usable_cpus().
_OMP_NUM_THREADS_SET = bool(os.environ.get("OMP_NUM_THREADS", "").strip())
_AUTOMATIC = object()          # a threads(None) block: automatic, not the global setting


def _resolve(n_threads: SupportsIndex | None) -> int | None:
    if n_threads is None:
        return None
    if isinstance(n_threads, bool):
        raise TypeError(f"the number of threads must be an int or None, got {n_threads!r}")
    try:
        count = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"the number of threads must be an int or None, "
                        f"got {n_threads!r}") from None
    if count == 0:
        raise ValueError("the number of threads must be non-zero, got 0 (None = automatic, "
                         "negative = count back from the number of CPUs)")
    if count > MAX_THREADS:
        raise ValueError(f"the number of threads must be at most {MAX_THREADS}, got "
                         f"{count} (this process may use {machine.usable_cpus()} CPUs)")
    if count < 0:
        return max(1, machine.usable_cpus() + 1 + count)
    return count


def set_num_threads(n_threads: SupportsIndex | None) -> None:
    """Set the threads cpubn's kernels use, process-wide: an int from 1 to MAX_THREADS
    (256), a negative int counting back from the usable CPUs (-1 = all of them), or None
    for automatic (OMP_NUM_THREADS / threadpoolctl, capped at the usable CPUs).
    """
    global _requested
    _requested = _resolve(n_threads)


def get_num_threads() -> int:
    """The number of threads a large kernel call from this Python thread will use now
    (1 in a child process made by fork())."""
    if _forked_child:
        return 1
    override = getattr(_local, "n_threads", None)
    requested = _requested if override is None else override
    if requested is None or requested is _AUTOMATIC:
        default: int = _runtime.omp_max_threads()
        if not _OMP_NUM_THREADS_SET:      # the runtime's own guess: cap at usable CPUs
            default = min(default, machine.usable_cpus())
        return max(1, min(default, MAX_THREADS))
    return requested


@contextlib.contextmanager
def threads(n_threads: SupportsIndex | None) -> Iterator[None]:
    """Context manager: `with cpubn.threads(4): ...` runs the calls that this Python thread
    makes in the block on 4 threads (None: automatic), then restores this thread's
    previous setting.  Other Python threads are not affected."""
    resolved = _resolve(n_threads)
    previous = getattr(_local, "n_threads", None)
    # threads(None) means automatic for the block, whatever set_num_threads said.
    _local.n_threads = _AUTOMATIC if resolved is None else resolved
    try:
        yield
    finally:
        _local.n_threads = previous


def _is_automatic() -> bool:
    override = getattr(_local, "n_threads", None)
    requested = _requested if override is None else override
    return requested is None or requested is _AUTOMATIC


def threads_for(n_elements: int, light: bool = False) -> int:
    """Threads for one kernel call over n_elements: 1 below the parallel threshold
    (EVAL_PARALLEL_FACTOR times as many for a `light` call: an eval forward).

    In automatic mode a call also uses no more threads than there are idle CPUs at that
    moment (at least one): a team member that has to wait for a core busy with another
    process stalls the whole call at its closing barrier, so beside a busy neighbour one
    thread is faster than two.  An explicit count (set_num_threads, threads(n)) is used
    as is.  The caller reports the end of a parallel call with team_finished."""
    if n_elements < (EVAL_PARALLEL_FACTOR if light else 1) * PARALLEL_MIN_ELEMENTS:
        return 1
    n_threads = get_num_threads()
    if n_threads > 1 and _is_automatic():
        own_tasks = 1 + (_spinning_workers if time.perf_counter() < _spinning_until else 0)
        idle = machine.idle_cpus(own_tasks)
        if idle is not None:
            n_threads = max(1, min(n_threads, idle))
    return n_threads


_spinning_workers = 0       # workers of the last parallel call (team_finished)
_spinning_until = 0.0       # when they may have stopped spinning (perf_counter seconds)


def team_finished(n_threads: int) -> None:
    """Note that a kernel call on n_threads threads has just returned: its workers spin
    for a while (SPIN_COUNT), which the next call's idle count must not take for a
    neighbour's tasks."""
    global _spinning_workers, _spinning_until
    if n_threads > 1:          # callers skip the call for one thread, where it does nothing
        _spinning_workers = n_threads - 1
        _spinning_until = time.perf_counter() + TEAM_SPIN_SECONDS


def openmp_enabled() -> bool:
    """True if this build has OpenMP (multi-threaded kernels); False for a serial build."""
    enabled: bool = _runtime.openmp_enabled()
    return enabled
