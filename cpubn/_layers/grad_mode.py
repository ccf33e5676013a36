"""Whether layers keep what their backward needs: ``cpubn.no_grad()`` turns that off for
the calls the current Python thread makes inside its block, as ``torch.no_grad()`` does."""
import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def saving_for_backward() -> bool:
    """False inside a no_grad() block of the calling Python thread."""
    return getattr(_state, "saving", True)


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
    previous = saving_for_backward()
    _state.saving = False
    try:
        yield
    finally:
        _state.saving = previous
