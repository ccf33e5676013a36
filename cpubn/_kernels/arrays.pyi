# Type stub for the compiled module built from src/cpubn/_kernels/arrays.pyx (keep the signatures
# in step with its `def` functions; tests/package/test_typing.py compares them).
from typing import Any

import numpy as np
from numpy.typing import NDArray

def first_bounds_overlap(out: NDArray[Any], pairs: tuple[tuple[object, str], ...],
                         start: int = 0) -> int: ...
def params_unchanged(current: tuple[object, ...], known: tuple[object, ...], length: int,
                     dtype: np.dtype[Any] | None) -> bool: ...
def out_still_fits(out: object, x: NDArray[Any], shape: tuple[int, ...],
                   strides: tuple[int, ...], dtype: np.dtype[Any], grad_weight: object,
                   grad_bias: object) -> bool: ...
