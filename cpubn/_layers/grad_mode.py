"""Whether layers keep what their backward needs: ``cpubn.no_grad()`` turns that off for
the calls the current Python thread makes inside its block, as ``torch.no_grad()`` does."""
import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()
# no_grad() blocks open in any thread: while there are none, which is nearly always, a
# call needs no thread-local lookup (a missing attribute of a threading.local costs a
# third of a small call).
_open_blocks = 0
_count_lock = threading.Lock()


def saving_for_backward() -> bool:
    """False inside a no_grad() block of the calling Python thread."""
    return not _open_blocks or getattr(_state, "saving", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager: the forwards that this Python thread runs in the block keep nothing
    for a backward (no reference to their input or output), so inference holds no more
    memory than its own results.  Training-mode forwards still update the running
    statistics; a backward of such a forward raises ValueError.  Other Python threads are
    not affected, and blocks nest.

    >>> import numpy as np, cpubn
    >>> bn = cpubn.BatchNorm(4).eval()
    >>> with cpubn.no_grad():
    ...     y = bn(np.ones((2, 4), np.float32))
    """
    global _open_blocks
    previous = getattr(_state, "saving", True)
    with _count_lock:
        _open_blocks += 1
    _state.saving = False
    try:
        yield
    finally:
        _state.saving = previous
        with _count_lock:
            _open_blocks -= 1
