"""Shared helpers for the cpubn test suite (imported by the test modules as bn_testing).

Data makers, the tolerance policy against the float64 reference
(tests/reference.py), central finite differences, and snapshots of a BatchNorm's state.
The pytest fixtures are in conftest.py; a test module never imports conftest by name,
because benchmarks/ has a conftest too (`pytest benchmarks` collects it).
"""

import os
import sys

import numpy as np
import pytest

# The oracle (reference.py) and these helpers are imported by the test modules.
sys.path.insert(0, os.path.dirname(__file__))

DTYPES = [np.float32, np.float64]

# (ndim, axis): channels-first, channels-last and a middle feature axis.
LAYOUTS = [(2, 1), (2, -1), (2, 0), (3, 1), (3, -1), (4, 1), (4, -1), (4, 2),
           (5, 1), (5, -1), (5, 2)]

# Relative tolerance, absolute tolerance as a fraction of max(1, max |expected|).
TOL = {
    (np.float64, "value"): (1e-10, 1e-12),
    (np.float32, "value"): (1e-5, 1e-5),
    (np.float64, "grad"): (1e-9, 1e-11),
    (np.float32, "grad"): (1e-4, 2e-5),
    # Running statistics stored in float32: one rounding per update step.
    (np.float64, "stat"): (1e-12, 1e-14),
    (np.float32, "stat"): (2e-6, 1e-7),
}


def core_grid(flag_sets, flag_names):
    """Cases for the core numerics grid.

    Full product of dtype x layout x train/eval x flag set; the thread count
    (1 or 2) alternates so that every dtype, layout, mode and flag set meets
    both thread counts without doubling the grid (the small arrays here run
    serially anyway; tests/kernels/test_threads.py covers threads on big inputs).
    """
    cases = []
    for d, dtype in enumerate(DTYPES):
        for l, (ndim, axis) in enumerate(LAYOUTS):
            for t, training in enumerate((True, False)):
                for f, flags in enumerate(flag_sets):
                    n_threads = (1, 2)[(d + l + t + f) % 2]
                    ident = "-".join([np.dtype(dtype).name, f"ndim{ndim}", f"axis{axis}",
                                      "train" if training else "eval"]
                                     + [f"{k}={v}" for k, v in zip(flag_names, flags)]
                                     + [f"threads{n_threads}"])
                    cases.append(pytest.param(dtype, ndim, axis, training, flags, n_threads,
                                              id=ident))
    return cases


def shape_for(ndim, axis, C, sizes=(3, 2, 3, 2, 2)):
    """A small shape of ``ndim`` dims with ``C`` at ``axis``."""
    shape = list(sizes[:ndim])
    shape[axis % ndim] = C
    return tuple(shape)


def channel_shape(shape, axis):
    b = [1] * len(shape)
    b[axis % len(shape)] = shape[axis % len(shape)]
    return tuple(b)


def make_x(rng, shape, dtype=np.float64, axis=1, loc=2.0, spread=(0.5, 2.0)):
    """Normal data with a different mean and scale in every channel."""
    C = shape[axis % len(shape)]
    bshape = channel_shape(shape, axis)
    mean = rng.uniform(-loc, loc, C).reshape(bshape)
    std = rng.uniform(*spread, C).reshape(bshape)
    return (rng.standard_normal(shape) * std + mean).astype(dtype)


def normal_data(rng, shape, scale=1.0, dtype=np.float32):
    """Standard normal data times ``scale``, in ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_params(rng, C, dtype=np.float64):
    """Random (weight, bias, running_mean, running_var) in ``dtype``."""
    return (rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype),
            rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype))


def randomize(bn, rng):
    """Give a BatchNorm random parameters and running statistics (in place)."""
    w, b, rm, rv = make_params(rng, bn.num_features)
    if bn.affine:
        bn.weight[...] = w
        bn.bias[...] = b
    if bn.track_running_stats:
        bn.running_mean[...] = rm
        bn.running_var[...] = rv
    return bn


def assert_close(got, expected, dtype, kind="value", what=""):
    """Compare against a float64 reference with the dtype's tolerance."""
    rtol, atol = TOL[(np.dtype(dtype).type, kind)]
    got = np.asarray(got)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol,
                               atol=atol * scale, err_msg=what)


def numeric_grad(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of the array a,
    which f reads: each entry is moved by +-h in place and restored."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def snapshot(bn):
    """Copies of every mutable part of a BatchNorm's state."""
    out = {}
    for name in ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var"):
        v = getattr(bn, name)
        out[name] = None if v is None else np.array(v, copy=True)
    out["num_batches_tracked"] = bn.num_batches_tracked
    out["training"] = bn.training
    return out


def assert_same_state(bn, snap):
    now = snapshot(bn)
    for name, before in snap.items():
        after = now[name]
        if isinstance(before, np.ndarray):
            assert isinstance(after, np.ndarray) and bitwise_equal(after, before), name
        else:
            assert after == before, name
