"""The cases of test_worker_stack.py: half-precision forward and backward with the fused
epilogue on runs longer than a reduction tile and on wide channels-last rows, and a
float32 call large enough to stream its output, on 2 threads."""
import numpy as np

import cpubn


def run_all():
    import ml_dtypes
    results = {}
    rng = np.random.default_rng(0)
    cases = [((2, 3, 40000), 1), ((4, 5000), -1), ((2, 40, 96, 96), 1)]
    with cpubn.threads(2):
        for dtype in (np.float16, ml_dtypes.bfloat16):
            for shape, axis in cases:
                x = rng.standard_normal(shape).astype(dtype)
                r = rng.standard_normal(shape).astype(dtype)
                dy = rng.standard_normal(shape).astype(dtype)
                C = shape[axis]
                w = np.linspace(0.5, 1.5, C, dtype=np.float32)
                y, mean, invstd = cpubn.batch_norm_forward(x, w, None, axis=axis,
                                                           activation="relu", residual=r)
                dx, dw, db, dr = cpubn.batch_norm_backward(dy, x, mean, invstd, w, True, axis,
                                                           activation="relu", y=y,
                                                           residual=True)
                key = f"{np.dtype(dtype).name}-{'x'.join(map(str, shape))}"
                for name, value in (("y", y), ("dx", dx), ("dr", dr)):
                    results[f"{key}-{name}"] = value.view(np.uint16)
                results[f"{key}-dw"] = dw
        x = rng.standard_normal((8, 16, 256, 128)).astype(np.float32)      # 16 MiB: streams
        y, mean, invstd = cpubn.batch_norm_forward(x, axis=1)
        dx = cpubn.batch_norm_backward(x, x, mean, invstd, None, True, 1)[0]
        results["float32-stream-y"] = y
        results["float32-stream-dx"] = dx
    return results
