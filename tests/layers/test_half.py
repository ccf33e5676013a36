"""Half-precision data: float16 (NumPy) and bfloat16 (ml_dtypes, optional package).

Half-precision data is loaded into float32, computed like float32 data (float32
parameters, double sums) and each output is rounded once to the data's dtype.  The
oracles: NumPy's own float32 -> float16 / ml_dtypes' float32 -> bfloat16 rounding for the
conversions, the float64 reference (tests/reference.py) for the numerics, and PyTorch's
"mixed type" batch_norm where it is installed.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import cpubn
import reference as ref
from bn_testing import make_x

try:
    import ml_dtypes
except ImportError:          # bfloat16 is optional: its cases are skipped without it
    ml_dtypes = None

HALF_DTYPES = [pytest.param(np.float16, id="float16"),
               pytest.param("bfloat16", id="bfloat16",
                            marks=pytest.mark.skipif(ml_dtypes is None,
                                                     reason="ml_dtypes is not installed"))]

# Units in the last place: 2^-10 relative for float16 (10 mantissa bits), 2^-7 for bfloat16.
ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

# (shape, axis): channels-first with long and short runs, channels-last, plain (N, C).
LAYOUTS = [((6, 5, 7, 9), 1), ((4, 3, 300), 1), ((6, 7, 9, 5), -1), ((300, 7), -1),
           ((40, 6), 1)]

# eps = 2^-20 and running_var = 1 - 2^-20 give invstd = 1 exactly: with mean 0 an eval
# forward is then y = round(float(x) * weight), the conversion itself.
EXACT_EPS = 2.0 ** -20


def as_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def all_bit_patterns(dtype):
    return np.arange(1 << 16, dtype=np.uint16).view(as_dtype(dtype))


# Every bit pattern laid out as one channels-first run (the run loops) or as one row of
# 65536 channels (the channels-last loops), so both vector loops and their tails see them.
PATTERN_LAYOUTS = [pytest.param((1, 1, 1 << 16), 1, id="run"),
                   pytest.param((1, 1 << 16), -1, id="row")]


def exact_eval_layer(weight, shape, axis):
    bn = cpubn.BatchNorm(shape[axis], eps=EXACT_EPS, axis=axis).eval()
    bn.running_var[...] = 1 - 2.0 ** -20
    bn.weight[...] = weight
    return bn


def assert_within_ulps(got, expected, dtype, ulps=1.0, atol=0.0):
    """|got - expected| <= ulps units of the dtype at |expected| (+ atol), elementwise."""
    got = np.asarray(got).astype(np.float64)
    bound = ulps * ULP[as_dtype(dtype).name] * np.abs(expected) + atol
    excess = np.abs(got - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{as_dtype(dtype).name}: got {got[worst]!r}, expected "
                                f"{expected[worst]!r} (bound {bound[worst]:.3g})")


# ------------------------------------------------------------------ conversions

@pytest.mark.parametrize("shape,axis", PATTERN_LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_value_survives_load_and_store(dtype, shape, axis):
    # Each of the 65536 bit patterns goes through the kernel's load and store unchanged
    # (NaNs stay NaN; -0 becomes +0 from the + 0 shift, as it would in float32).
    x = all_bit_patterns(dtype).reshape(shape)
    y = exact_eval_layer(1.0, shape, axis)(x)
    assert y.dtype == x.dtype
    with np.errstate(invalid="ignore"):             # bfloat16 NaN payloads
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
    nan = np.isnan(x64)
    assert np.array_equal(np.isnan(y64), nan)
    nonzero = ~nan & (x64 != 0)
    assert np.array_equal(y.view(np.uint16)[nonzero], x.view(np.uint16)[nonzero])
    assert np.all(y64[x64 == 0] == 0)


@pytest.mark.parametrize("weight", [1 / 3, 3.0, 1000.0, 2.0 ** -10, 1e-7, -0.7],
                         ids=["third", "three", "overflow", "subnormals", "tiny", "negative"])
@pytest.mark.parametrize("shape,axis", PATTERN_LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_store_rounds_like_numpy(dtype, weight, shape, axis):
    # round(float(x) * w) for every input value: ties to even, overflow to inf, gradual
    # underflow into subnormals, compared with NumPy's / ml_dtypes' own cast.
    x = all_bit_patterns(dtype).reshape(shape)
    w32 = np.float32(weight)
    y = exact_eval_layer(w32, shape, axis)(x)
    with np.errstate(all="ignore"):
        expected = (x.astype(np.float32) * w32).astype(x.dtype)
    got64, exp64 = y.astype(np.float64), expected.astype(np.float64)
    assert np.array_equal(np.isnan(got64), np.isnan(exp64))
    both = ~np.isnan(exp64)
    np.testing.assert_array_equal(got64[both], exp64[both])


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_forward_within_one_ulp_of_float64_reference(rng, dtype, shape, axis, training):
    x = make_x(rng, shape, axis=axis).astype(as_dtype(dtype))
    C = shape[axis]
    bn = cpubn.BatchNorm(C, axis=axis)
    bn.weight[...] = rng.uniform(0.5, 2.0, C)
    bn.bias[...] = rng.uniform(-1, 1, C)
    bn.running_mean[...] = rng.uniform(-1, 1, C)
    bn.running_var[...] = rng.uniform(0.5, 2.0, C)
    weight, bias = bn.weight.copy(), bn.bias.copy()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    x_before = x.copy()
    y = bn.train(training)(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(x.view(np.uint16), x_before.view(np.uint16))
    if training:
        mean, var, count = ref.batch_stats(x, axis)
        np.testing.assert_allclose(bn.running_mean, 0.9 * rm.astype(np.float64) + 0.1 * mean,
                                   rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(bn.running_var, 0.9 * rv.astype(np.float64)
                                   + 0.1 * var * count / (count - 1), rtol=2e-6, atol=1e-7)
    else:
        mean, var = rm, rv
    expected = ref.normalize(x, mean, ref.invstd_of(var, bn.eps), weight, bias, axis)
    # float32 arithmetic, then one rounding: within one unit of the exact value, plus a
    # float32-sized term for values that cancel to near zero.
    assert_within_ulps(y, expected, dtype, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_against_float64_reference(rng, dtype, shape, axis, training):
    dt = as_dtype(dtype)
    x = make_x(rng, shape, axis=axis).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    C = shape[axis]
    bn = cpubn.BatchNorm(C, axis=axis)
    bn.weight[...] = rng.uniform(0.5, 2.0, C)
    bn.running_var[...] = rng.uniform(0.5, 2.0, C)
    bn.train(training)(x)
    if training:
        mean, var, _ = ref.batch_stats(x, axis)
    else:
        mean, var = bn.running_mean, bn.running_var
    invstd = ref.invstd_of(var, bn.eps)
    dx = bn.backward(dy)
    assert dx.dtype == dt
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, bn.weight, training, axis)
    # dx cancels (dy - mean(dy) - xhat * mean(dy * xhat)) in float32 before its rounding.
    assert_within_ulps(dx, dx_ref, dtype, atol=1e-5 * np.abs(dx_ref).max())
    assert bn.grad_weight.dtype == bn.grad_bias.dtype == np.float32
    scale = np.abs(ref.to_rows(dy, axis)).sum(axis=0) * np.abs(
        ref.to_rows(x, axis) - mean).max(axis=0) * invstd
    np.testing.assert_array_less(np.abs(bn.grad_weight - dw_ref), 1e-6 * scale + 1e-30)
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-5,
                               atol=1e-6 * np.abs(dy.astype(np.float64)).sum())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_statistics_are_float32_accurate(rng, dtype):
    # The saved statistics come from float32/double arithmetic on the half values, not
    # from half arithmetic: they match the float64 reference of the same values closely.
    x = (rng.standard_normal((64, 8, 31)) * 3 + 100).astype(as_dtype(dtype))
    _, save_mean, save_invstd = cpubn.batch_norm_forward(x)
    mean, var, _ = ref.batch_stats(x, 1)
    np.testing.assert_allclose(save_mean, mean, rtol=1e-9)
    np.testing.assert_allclose(save_invstd, ref.invstd_of(var, 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_same_result_as_float32_data_of_the_same_values(rng, dtype):
    # "Mixed type": half data gives float32 data's result rounded once to half, also for
    # runs longer than a reduction chunk and rows wider than a conversion tile.
    for shape, axis in LAYOUTS + [((2, 3, 20000), 1), ((9, 2500), -1), ((20, 3, 700), -1)]:
        x = make_x(rng, shape, axis=axis).astype(as_dtype(dtype))
        bn = cpubn.BatchNorm(shape[axis], axis=axis)
        y = bn(x)
        y32 = cpubn.BatchNorm(shape[axis], axis=axis)(x.astype(np.float32))
        np.testing.assert_array_equal(y.view(np.uint16), y32.astype(x.dtype).view(np.uint16))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bitwise_identical_for_any_thread_count(rng, dtype, axis):
    shape = (16, 24, 30, 30) if axis == 1 else (16, 30, 30, 24)     # parallel-sized
    x = make_x(rng, shape, axis=axis).astype(as_dtype(dtype))
    dy = rng.standard_normal(shape).astype(x.dtype)
    results = []
    for n_threads in (1, 2, 3):
        with cpubn.threads(n_threads):
            bn = cpubn.BatchNorm(shape[axis], axis=axis)
            y = bn(x)
            dx = bn.backward(dy)
        results.append((y.view(np.uint16), dx.view(np.uint16), bn.grad_weight, bn.running_var))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_hostile_half_values(rng, dtype, axis):
    dt = as_dtype(dtype)
    shape = (8, 4, 33) if axis == 1 else (8, 33, 4)
    x = make_x(rng, shape, axis=axis).astype(dt)
    index = [slice(None)] * 3
    # channel 0 constant: exactly its bias; channel 1 holds NaN: NaN everywhere in it;
    # channel 2 holds values near the largest a float32 variance can take (float16: its
    # largest finite values): finite statistics, outputs as exact as usual.
    index[axis] = 0
    x[tuple(index)] = np.asarray(3.5, dt)
    index[axis] = 1
    x[tuple(index)] = np.asarray(1.0, dt)
    first = [0] * 3
    first[axis] = 1
    x[tuple(first)] = np.asarray(np.nan, dt)
    index[axis] = 2
    big = np.asarray(60000.0 if dt == np.float16 else 1e18, np.float64)
    x[tuple(index)] = (np.sign(rng.standard_normal(x[tuple(index)].shape)) * big).astype(dt)
    bn = cpubn.BatchNorm(4, axis=axis)
    bn.bias[...] = [0.25, 0, 0, 0]
    y = bn(x).astype(np.float64)
    index[axis] = 0
    assert np.all(y[tuple(index)] == 0.25)
    index[axis] = 1
    assert np.all(np.isnan(y[tuple(index)])) and np.isnan(bn.running_mean[1])
    assert np.all(np.isfinite(bn.running_var[[0, 2, 3]]))
    for channel in (2, 3):
        index[axis] = channel
        values = x[tuple(index)].astype(np.float64)
        expected = (values - values.mean()) / np.sqrt(values.var() + bn.eps)
        assert_within_ulps(y[tuple(index)], expected, dtype, atol=1e-6)


def test_output_overflow_gives_infinity(rng):
    # float16 holds at most 65504: a normalized value scaled past it becomes +-inf, as
    # the float32 result cast to float16 would.
    x = rng.standard_normal((16, 2, 9)).astype(np.float16)
    bn = cpubn.BatchNorm(2)
    bn.weight[...] = 1e6
    y = bn(x)
    y32 = cpubn.BatchNorm(2)
    y32.weight[...] = 1e6
    with np.errstate(over="ignore"):
        expected = y32(x.astype(np.float32)).astype(np.float16)
    assert np.any(np.isinf(y))
    np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))


# ------------------------------------------------------------------ fused epilogue

# The first three layouts, plus runs longer than a conversion tile (the reductions' tiles
# are longer) and rows wider than one.
FUSED_LAYOUTS = LAYOUTS[:3] + [((2, 3, 5000), 1), ((4, 2500), -1)]


@pytest.mark.parametrize("shape,axis", FUSED_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fused_relu_residual_equals_unfused_half_sequence(rng, dtype, shape, axis, training):
    dt = as_dtype(dtype)
    x = make_x(rng, shape, axis=axis).astype(dt)
    r = rng.standard_normal(shape).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    C = shape[axis]
    plain = cpubn.BatchNorm(C, axis=axis).train(training)
    fused = cpubn.BatchNorm(C, axis=axis, activation="relu").train(training)
    with np.errstate(all="ignore"):
        unfused = (plain(x).astype(np.float32) + r.astype(np.float32)).astype(dt)
        unfused = np.where(unfused.astype(np.float32) < 0, np.zeros((), dt), unfused)
    y = fused(x, residual=r)
    np.testing.assert_array_equal(y.view(np.uint16), unfused.view(np.uint16))
    dx, dr = fused.backward(dy)
    assert dx.dtype == dr.dtype == dt
    mask = y.astype(np.float64) > 0
    np.testing.assert_array_equal(dr.astype(np.float64), np.where(mask, dy.astype(np.float64), 0))
    np.testing.assert_array_equal(dx.view(np.uint16), plain.backward(dr).view(np.uint16))


# ------------------------------------------------------------------ API and bad input

def test_float64_layer_takes_half_input_with_float32_parameters(rng):
    x = make_x(rng, (8, 4, 5), axis=1).astype(np.float16)
    bn64 = cpubn.BatchNorm(4, dtype=np.float64)
    bn32 = cpubn.BatchNorm(4)
    for bn in (bn64, bn32):
        bn.weight[...] = [0.5, 1.5, 2.0, 0.25]          # exact in float32
    np.testing.assert_array_equal(bn64(x).view(np.uint16), bn32(x).view(np.uint16))
    assert bn64.running_mean.dtype == np.float64
    np.testing.assert_allclose(bn64.running_mean, bn32.running_mean, rtol=1e-6)
    dy = np.ones_like(x)
    np.testing.assert_array_equal(bn64.backward(dy).view(np.uint16),
                                  bn32.backward(dy).view(np.uint16))


def test_alternating_dtypes_get_fresh_parameter_checks(rng):
    # The layer caches its parameter check; float64 parameters serve float64 data as they
    # are but must be read as float32 for half data, whatever came before.
    x = make_x(rng, (8, 4, 5), axis=1)
    bn = cpubn.BatchNorm(4, dtype=np.float64).eval()
    bn.weight[...] = [0.5, 1.5, 2.0, 0.25]
    reference32 = cpubn.BatchNorm(4).eval()
    reference32.weight[...] = bn.weight
    for _ in range(2):
        expected = ref.normalize(x, np.zeros(4), ref.invstd_of(np.ones(4), 1e-5), bn.weight)
        np.testing.assert_allclose(bn(x), expected, rtol=1e-12)
        np.testing.assert_array_equal(bn(x.astype(np.float16)).view(np.uint16),
                                      reference32(x.astype(np.float16)).view(np.uint16))


def test_functional_half_with_float64_arrays(rng):
    x = make_x(rng, (8, 4, 5), axis=1).astype(np.float16)
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, invstd = cpubn.batch_norm_forward(x, np.ones(4), np.zeros(4), rm, rv)
    assert y.dtype == np.float16 and mean.dtype == np.float64
    assert rm.dtype == np.float64 and np.any(rm != 0)           # updated in place
    dx, dw, db = cpubn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert dx.dtype == np.float16 and dw.dtype == db.dtype == np.float32


def test_non_native_byte_order_half(rng):
    x = make_x(rng, (8, 4, 5), axis=1).astype(np.float16)
    swapped = x.astype(x.dtype.newbyteorder(">"))
    np.testing.assert_array_equal(cpubn.BatchNorm(4)(swapped).view(np.uint16),
                                  cpubn.BatchNorm(4)(x).view(np.uint16))


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_parameter_dtype_is_refused(dtype):
    if dtype == "bfloat16" and ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    with pytest.raises(TypeError, match="float32"):
        cpubn.BatchNorm(4, dtype=as_dtype(dtype))


def test_half_bad_out_and_dy_change_nothing(rng):
    x = make_x(rng, (8, 4, 5), axis=1).astype(np.float16)
    bn = cpubn.BatchNorm(4)
    bn(x)
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match="float32"):
        bn(x, out=np.empty(x.shape, np.float32))
    with pytest.raises(TypeError, match="float32"):
        bn(x.astype(np.float32), residual=x)           # residual must match the input
    with pytest.raises(TypeError, match="float32"):
        bn.backward(np.ones(x.shape, np.float32))
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    if ml_dtypes is not None:
        with pytest.raises(TypeError, match="bfloat16"):
            bn.backward(np.ones(x.shape, ml_dtypes.bfloat16))


@pytest.mark.parametrize("name", ["float8_e4m3fn", "int4"])
def test_other_ml_dtypes_are_refused(name):
    if ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    x = np.ones((4, 3), getattr(ml_dtypes, name))
    with pytest.raises(TypeError, match=name):
        cpubn.BatchNorm(3)(x)


# ------------------------------------------------------------------ portable conversions

PORTABLE_SCRIPT = """
import sys
import numpy as np
import cpubn
from cpubn._kernels.forward import half_conversions
assert half_conversions() == {"float16": "portable", "bfloat16": "portable"}
sys.path[:0] = sys.argv[2:]
from test_half import conversion_workout
np.savez(sys.argv[1], **conversion_workout())
"""


def conversion_workout():
    """Every kernel family on half data: forward (train, eval, ReLU + residual) and
    backward (through the mask) in both layouts, plus the 65536 bit patterns, as a dict of
    arrays.  Run in two processes to compare the vector and portable conversions."""
    rng = np.random.default_rng(7)
    results = {}
    dtypes = ["float16"] + (["bfloat16"] if ml_dtypes is not None else [])
    for name in dtypes:
        dt = as_dtype(name)
        for shape, axis in [((5, 6, 301), 1), ((2, 3, 5000), 1), ((4, 9, 9, 21), -1),
                            ((3, 2500), -1)]:
            x = (rng.standard_normal(shape) * 3 + 1).astype(dt)
            r = rng.standard_normal(shape).astype(dt)
            dy = rng.standard_normal(shape).astype(dt)
            key = f"{name}-{axis}-{shape[axis]}"
            bn = cpubn.BatchNorm(shape[axis], axis=axis)
            results[key + "-train"] = bn(x)
            results[key + "-dx"] = bn.backward(dy)
            results[key + "-eval"] = bn.eval()(x)
            fused = cpubn.BatchNorm(shape[axis], axis=axis, activation="relu")
            results[key + "-fused"] = fused(x, residual=r)
            dx, dr = fused.backward(dy)
            results[key + "-fused-dx"], results[key + "-fused-dr"] = dx, dr
        for shape, axis in [((1, 1, 1 << 16), 1), ((1, 1 << 16), -1)]:
            bn = exact_eval_layer(np.float32(1 / 3), shape, axis)
            results[f"{name}-patterns{axis}"] = bn(all_bit_patterns(name).reshape(shape))
    return {key: value.view(np.uint16) for key, value in results.items()}


def test_portable_conversions_give_the_same_bits(tmp_path):
    # CPUBN_PORTABLE_HALF=1 turns off the F16C / AVX2 conversions (read once per process,
    # hence the subprocess): the portable code must agree bit for bit.
    path = tmp_path / "portable.npz"
    env = dict(os.environ, CPUBN_PORTABLE_HALF="1")
    folder = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, str(path), folder,
                    os.path.dirname(folder)],
                   env=env, check=True)
    here = conversion_workout()
    with np.load(path) as portable:
        assert set(portable.files) == set(here)
        for key, value in here.items():
            np.testing.assert_array_equal(portable[key], value, err_msg=key)


def test_info_names_the_conversions():
    from cpubn._kernels.forward import half_conversions
    kinds = half_conversions()
    assert kinds["float16"] in ("F16C", "portable") and kinds["bfloat16"] in ("AVX2", "portable")
    run = [sys.executable, "-m", "cpubn", "info"]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert f"float16 {kinds['float16']}, bfloat16 {kinds['bfloat16']}" in out
    env = dict(os.environ, CPUBN_PORTABLE_HALF="1")
    out = subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout
    assert "float16 portable, bfloat16 portable" in out


# ------------------------------------------------------------------ PyTorch parity

@pytest.mark.parametrize("shape,axis", [((6, 5, 7, 9), 1), ((6, 7, 9, 5), -1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_torch_mixed_type_parity(rng, dtype, shape, axis, training):
    torch = pytest.importorskip("torch")
    dt = as_dtype(dtype)
    x = make_x(rng, shape, axis=axis).astype(dt)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    rm, rv = rng.uniform(-1, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    tx = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dt.name))
    if axis == -1:
        tx = tx.permute(0, 3, 1, 2)                   # torch wants channels on dim 1
    ty = torch.nn.functional.batch_norm(tx, torch.tensor(rm), torch.tensor(rv),
                                        torch.tensor(w), torch.tensor(b), training=training)
    if axis == -1:
        ty = ty.permute(0, 2, 3, 1)
    y = cpubn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, axis=axis)
    expected = ty.float().numpy().astype(np.float64)
    # Both round a float32 result once; they may differ by one unit where float32
    # intermediates differ.
    assert_within_ulps(y, expected, dtype, ulps=1.0, atol=1e-6)


# ------------------------------------------------------------------ bench command

def test_bench_half_smoke(tmp_path, capsys):
    import json

    from cpubn.bench import cli

    path = tmp_path / "half.json"
    rc = cli.main(["--half", "--shape", "4,8,5,5", "--shape", "1,8,3,3", "--repeats", "1",
                      "--threads", "1", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    names = ["float32", "float16"] + (["bfloat16"] if ml_dtypes is not None else [])
    assert report["config"]["dtypes"] == names
    cases = {(tuple(r["shape"]), r["layout"], r["op"]) for r in report["results"]}
    assert cases == ({((4, 8, 5, 5), layout, op) for layout in ("nchw", "nhwc")
                      for op in ("train", "eval", "backward")}
                     | {((1, 8, 3, 3), layout, "eval") for layout in ("nchw", "nhwc")})
    for r in report["results"]:
        assert not [e for e in r["errors"] if e.startswith("cpubn")], r["errors"]
        assert {f"cpubn_{d}" for d in names} <= set(r["median_ms"])
        assert r["ratios"]["cpubn float32/float16"] > 0
    out = capsys.readouterr().out
    assert "median cpubn float32/float16" in out


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_same_result_as_float32_data_of_the_same_values(rng, dtype, activation):
    # The backward too: dx is float32 data's dx rounded once, and the parameter gradients
    # are float32 data's, bit for bit, including channels-last rows wider than a
    # conversion tile ((9, 2500)) and tiles that cut a group of rows ((20, 3, 700)).
    for shape, axis in LAYOUTS + [((2, 3, 20000), 1), ((9, 2500), -1), ((20, 3, 700), -1),
                                  ((16, 40, 8, 8), 1), ((4, 9, 7, 70), -1)]:
        x = make_x(rng, shape, axis=axis).astype(as_dtype(dtype))
        dy = rng.standard_normal(shape).astype(as_dtype(dtype))
        half = cpubn.BatchNorm(shape[axis], axis=axis, activation=activation)
        single = cpubn.BatchNorm(shape[axis], axis=axis, activation=activation)
        half(x)
        single(x.astype(np.float32))
        dx = half.backward(dy)
        dx32 = single.backward(dy.astype(np.float32))
        np.testing.assert_array_equal(dx.view(np.uint16), dx32.astype(x.dtype).view(np.uint16),
                                      err_msg=f"{shape} axis {axis}")
        np.testing.assert_array_equal(half.grad_weight, single.grad_weight)
        np.testing.assert_array_equal(half.grad_bias, single.grad_bias)
