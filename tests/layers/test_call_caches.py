"""BatchNorm.forward skips the checks of an `out` it checked on the previous call when
their facts have not changed (cpubn._layers.batchnorm.BatchNorm._check_forward_out): every check
must still hold when anything it relied on changes between calls."""
import warnings

import numpy as np
import pytest

import cpubn
from bn_testing import normal_data
import reference as ref

C = 16


def _layer(training=False):
    bn = cpubn.BatchNorm(C)
    bn.train(training)
    return bn


def _x(n=4):
    return np.random.default_rng(0).standard_normal((n, C)).astype(np.float32)


@pytest.mark.parametrize("training", [False, True])
def test_same_out_again_gives_the_same_result(training):
    x = _x()
    bn, ref = _layer(training), _layer(training)
    out = np.empty_like(x)
    for _ in range(3):
        assert bn(x, out=out) is out
        np.testing.assert_array_equal(out, ref(x))
    np.testing.assert_array_equal(bn.running_mean, ref.running_mean)


def test_out_made_read_only():
    x, bn = _x(), _layer()
    out = np.empty_like(x)
    bn(x, out=out)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        bn(x, out=out)


def test_out_reshaped_or_retyped_in_place():
    x, bn = _x(), _layer()
    out = np.empty_like(x)
    bn(x, out=out)
    out.shape = (C, 4)
    with pytest.raises(ValueError, match="shape"):
        bn(x, out=out)
    out.shape = (4, C)
    bn(x, out=out)
    out.dtype = np.int32
    with pytest.raises(TypeError, match="dtype"):
        bn(x, out=out)


def test_a_new_input_that_is_out_or_overlaps_it():
    x, bn = _x(), _layer(training=True)
    out = np.empty_like(x)
    bn(x, out=out)
    out[...] = x
    y = bn(out, out=out)                        # in place: x's memory
    assert y is out
    with pytest.raises(ValueError, match="in-place forward"):
        bn.backward(np.ones_like(out))
    buffer = np.zeros((5, C), np.float32)
    bn(x, out=buffer[1:])
    buffer[:4] = x
    with pytest.raises(ValueError, match="partially overlaps"):
        bn(buffer[:4], out=buffer[1:])


def test_a_residual_overlapping_out():
    x, bn = _x(), _layer()
    out = np.empty_like(x)
    bn(x, out=out)
    with pytest.raises(ValueError, match="overlaps the residual"):
        bn(x, out=out, residual=out)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var",
                                  "grad_weight", "grad_bias"])
def test_a_per_channel_array_rebound_onto_out(name):
    buffer = np.zeros(8 * C, np.float32)
    x, bn = _x(), _layer()
    out = buffer[:4 * C].reshape(4, C)
    bn(x, out=out)
    setattr(bn, name, buffer[2 * C:3 * C])     # inside out's memory
    with pytest.raises(ValueError, match=f"overlaps {name}"):
        bn(x, out=out)


@pytest.mark.parametrize("name", ["grad_weight", "grad_bias"])
def test_a_gradient_restrided_in_place_onto_out(name):
    # The same object, its extent changed in place: identity alone is not enough.
    buffer = np.zeros(8 * C, np.float32)
    x, bn = _x(), _layer()
    setattr(bn, name, buffer[:C])
    out = buffer[4 * C:].reshape(4, C)
    bn(x, out=out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # NumPy 2.4 deprecates it
        getattr(bn, name).strides = (4 * 5,)     # C values 5 apart: into out's memory
    with pytest.raises(ValueError, match=f"overlaps {name}"):
        bn(x, out=out)


def test_a_parameter_converted_on_every_call_is_checked_every_call():
    x, bn = _x(), _layer()
    bn.weight = np.ones(C, np.float64)          # converted to float32 for the kernels
    out = np.empty_like(x)
    bn(x, out=out)
    bn(x, out=out)
    assert bn._checked_out is None
    bn.weight = out[1]                           # now inside out's memory
    with pytest.raises(ValueError, match="overlaps weight"):
        bn(x, out=out)


def test_out_is_not_kept_alive():
    import gc
    import weakref
    x, bn = _x(), _layer()
    out = np.empty_like(x)
    bn(x, out=out)
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ parameter cache
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_in_place_resize_of_a_cached_parameter_is_caught(name, rng):
    bn = cpubn.BatchNorm(64)
    x = normal_data(rng, (8, 64))
    bn(x)                                   # caches the parameter check
    getattr(bn, name).resize(1, refcheck=False)
    bn.eval()
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        bn(x)


@pytest.mark.parametrize("name", ["weight", "running_var"])
def test_in_place_dtype_change_of_a_cached_parameter_is_caught(name, rng):
    bn = cpubn.BatchNorm(64)
    x = normal_data(rng, (8, 64))
    bn.eval()
    bn(x)
    getattr(bn, name).dtype = np.float64    # same memory read as 32 doubles
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        bn(x)


def test_reassigned_parameter_of_another_dtype_is_used(rng):
    bn = cpubn.BatchNorm(4).eval()
    x = normal_data(rng, (8, 4))
    bn(x)
    bn.weight = np.full(4, 2.0)             # float64 array into a float32 layer
    expected = ref.functional_forward(x, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, training=False)[0]
    np.testing.assert_allclose(bn(x), expected, rtol=1e-6, atol=1e-6)
