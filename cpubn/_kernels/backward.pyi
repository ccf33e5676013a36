# Type stub for the compiled module built from src/cpubn/_kernels/backward.pyx (keep the signature
# in step with its `def` function; tests/package/test_typing.py compares them).
from typing import Any

import numpy as np
from numpy.typing import NDArray

def backward(dy: NDArray[Any], x: NDArray[Any], dx: NDArray[Any], stats: NDArray[np.float64],
             weight: NDArray[Any] | None, training: bool, grads: NDArray[np.float64],
             N: int, C: int, S: int, n_threads: int, stream: bool,
             y: NDArray[Any] | None = None, dresidual: NDArray[Any] | None = None) -> None: ...
