# Type stub for the compiled module built from src/cpubn/_kernels/forward.pyx (keep the signatures
# in step with its `def` functions; tests/package/test_typing.py compares them).  Data arrays are
# any of the kernels' dtypes (float32, float64, float16, bfloat16); stats are float64.
from typing import Any

import numpy as np
from numpy.typing import NDArray

def forward_train(x: NDArray[Any], y: NDArray[Any], weight: NDArray[Any] | None,
                  bias: NDArray[Any] | None, eps: float, stats: NDArray[np.float64],
                  N: int, C: int, S: int, n_threads: int, stream: bool,
                  residual: NDArray[Any] | None = None, relu: bool = False) -> None: ...
def forward_eval(x: NDArray[Any], y: NDArray[Any], mean: NDArray[Any] | None,
                 var: NDArray[Any] | None, weight: NDArray[Any] | None,
                 bias: NDArray[Any] | None, eps: float, stats: NDArray[np.float64], N: int,
                 C: int, S: int, n_threads: int, stream: bool,
                 residual: NDArray[Any] | None = None, relu: bool = False) -> bool: ...
def half_conversions() -> dict[str, str]: ...
def batch_stats(x: NDArray[Any], eps: float, stats: NDArray[np.float64], N: int, C: int,
                S: int, n_threads: int) -> None: ...
def update_running_stats(running_mean: NDArray[Any] | None, running_var: NDArray[Any] | None,
                         mean: NDArray[np.float64], batch_var: NDArray[np.float64], C: int,
                         var_scale: float, factor: float,
                         counter: NDArray[np.int64] | None = None) -> None: ...
