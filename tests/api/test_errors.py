"""Bad input: the right exception, a message naming the offending value, and nothing lost.

After every failed call the object's running_mean, running_var,
num_batches_tracked, gradients and saved forward state must be exactly as
before: the test then runs the backward the earlier forward prepared and
checks it against the reference.
"""

import re
from dataclasses import dataclass

import numpy as np
import pytest

import cpubn
from bn_testing import (assert_close, assert_same_state, bitwise_equal, make_x, normal_data,
                        randomize, snapshot)
from reference import RefBatchNorm

C = 3
SHAPE = (4, C, 5)
READ_ONLY = r"(?i)read-only|read only|writeable|writable"


def both(*numbers):
    """Regex matching a message that contains every one of ``numbers`` as a token."""
    return "(?s)" + "".join(rf"(?=.*(?<![\w.]){n}(?![\w.]))" for n in numbers)


@dataclass
class Primed:
    bn: object
    expected: RefBatchNorm
    x: np.ndarray
    dy: np.ndarray

    def expect_failure(self, exc, call, match=None):
        snap = snapshot(self.bn)
        with pytest.raises(exc, match=match) as info:
            call()
        assert_same_state(self.bn, snap)
        # The saved forward state still gives the backward of the last good forward.
        dx = self.bn.backward(self.dy)
        assert_close(dx, self.expected.backward(self.dy), np.float64, "grad", "dx after failure")
        assert_close(self.bn.grad_weight, self.expected.grad_weight, np.float64, "grad")
        assert_close(self.bn.grad_bias, self.expected.grad_bias, np.float64, "grad")
        return info


@pytest.fixture(params=[True, False], ids=["train", "eval"])
def primed(request, rng):
    """A float64 BatchNorm after two training steps, a backward, and a last forward of x."""
    bn = randomize(cpubn.BatchNorm(C, dtype=np.float64), rng)
    expected = RefBatchNorm.like(bn)
    for _ in range(2):
        x = make_x(rng, SHAPE, np.float64)
        dy = rng.standard_normal(SHAPE)
        bn(x)
        expected(x)
        bn.backward(dy)
        expected.backward(dy)
    if not request.param:
        bn.eval()
        expected.training = False
    x = make_x(rng, SHAPE, np.float64)
    bn(x)
    expected(x)
    return Primed(bn, expected, x, rng.standard_normal(SHAPE))


# ------------------------------------------------------------------ input dtype

BAD_DTYPES = [
    (np.int32, "int32"), (np.int64, "int64"), (np.bool_, "bool"), (np.complex128, "complex128"),
    (np.complex64, "complex64"), (object, "object"), (np.longdouble, "float128"), (np.uint8, "uint8"),
]


@pytest.mark.parametrize("dtype,name", BAD_DTYPES, ids=[n for _, n in BAD_DTYPES])
def test_bad_dtype_forward(primed, dtype, name):
    x = np.ones(SHAPE, dtype=dtype)
    primed.expect_failure(TypeError, lambda: primed.bn(x), match=name)


def test_string_input(primed):
    x = np.full(SHAPE, "a")
    primed.expect_failure(TypeError, lambda: primed.bn(x), match=r"<U1|str|unicode|U1")


@pytest.mark.parametrize("garbage", [None, object(), "hello", {"a": 1}], ids=["None", "object", "str", "dict"])
def test_garbage_input(primed, garbage):
    primed.expect_failure(TypeError, lambda: primed.bn(garbage))


@pytest.mark.parametrize("dtype,name", BAD_DTYPES[:4] + BAD_DTYPES[6:7], ids=["int32", "int64", "bool", "complex128", "float128"])
def test_bad_dtype_functional(dtype, name):
    x = np.ones(SHAPE, dtype=dtype)
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(TypeError, match=name):
        cpubn.batch_norm(x, rm, rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(TypeError, match=name):
        cpubn.batch_norm_forward(x)
    with pytest.raises(TypeError, match=name):
        cpubn.batch_norm_backward(np.ones(SHAPE), x, np.zeros(C), np.ones(C))
    with pytest.raises(TypeError, match=name):
        cpubn.batch_norm_backward(x, np.ones(SHAPE), np.zeros(C), np.ones(C))


# ------------------------------------------------------------------ shapes and axis

@pytest.mark.parametrize("shape", [(C,), ()], ids=["1d", "0d"])
def test_ndim_below_two(primed, shape):
    x = np.ones(shape)
    primed.expect_failure(ValueError, lambda: primed.bn(x), match=rf"(?is)dim.*{len(shape)}")


@pytest.mark.parametrize("axis", [3, 7, -4])
def test_axis_out_of_range(rng, axis):
    bn = cpubn.BatchNorm(C, axis=axis, dtype=np.float64)
    snap = snapshot(bn)
    with pytest.raises(ValueError, match=both(axis)):
        bn(make_x(rng, SHAPE, np.float64))
    assert_same_state(bn, snap)
    with pytest.raises(ValueError, match=both(axis)):
        cpubn.batch_norm_forward(make_x(rng, SHAPE, np.float64), axis=axis)
    with pytest.raises(ValueError, match=both(axis)):
        cpubn.batch_norm(make_x(rng, SHAPE, np.float64), None, None, training=True, axis=axis)


@pytest.mark.parametrize("shape", [(4, 5, 2), (4, 7), (2, 2, 2, 2)])
def test_channel_count_mismatch(primed, shape):
    x = np.ones(shape)
    primed.expect_failure(ValueError, lambda: primed.bn(x), match=both(shape[1], C))


def test_channel_count_mismatch_channels_last(rng):
    bn = cpubn.BatchNorm(6, axis=-1)
    with pytest.raises(ValueError, match=both(5, 6)):
        bn(np.ones((2, 3, 5), dtype=np.float32))
    assert bn.num_batches_tracked == 0 and np.all(bn.running_mean == 0)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_one_value_per_channel_in_training(primed, shape):
    if not primed.bn.training:
        primed.bn.train()
        primed.expected.training = True
    x = np.ones(shape)
    primed.expect_failure(ValueError, lambda: primed.bn(x), match=r"(?i)per channel")


def test_one_value_per_channel_functional():
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError):
        cpubn.batch_norm(np.ones((1, C)), rm, rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(ValueError):
        cpubn.batch_norm_forward(np.ones((1, C, 1)), training=True)


def test_one_value_per_channel_no_tracking_eval():
    """track_running_stats=False normalizes with batch statistics even in eval,
    so one value per channel is as invalid as in training (PyTorch raises too)."""
    bn = cpubn.BatchNorm(C, track_running_stats=False).eval()
    with pytest.raises(ValueError):
        bn(np.ones((1, C), dtype=np.float32))


def test_empty_channel_axis():
    """An empty batch is taken as PyTorch takes it (tests/layers/test_empty_batch.py); an
    empty feature axis is an error."""
    bn = cpubn.BatchNorm(C)
    with pytest.raises(ValueError, match="0 features"):
        bn(np.ones((4, 0, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="no features"):
        cpubn.batch_norm(np.ones((4, 0), np.float32), None, None, training=True)


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("kwargs,shown", [
    (dict(eps=0.0), r"0(\.0)?"), (dict(eps=-1e-5), r"-1e-05"), (dict(eps=-2.5), r"-2\.5"),
    (dict(momentum=-0.1), r"-0\.1"), (dict(momentum=1.5), r"1\.5"),
    (dict(eps=float("nan")), r"(?i)nan"), (dict(momentum=float("nan")), r"(?i)nan"),
])
def test_bad_hyperparameters(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        cpubn.BatchNorm(C, **kwargs)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_num_features(n):
    with pytest.raises(ValueError, match=both(n)):
        cpubn.BatchNorm(n)


@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
def test_momentum_bounds_are_valid(momentum):
    assert cpubn.BatchNorm(C, momentum=momentum).momentum == momentum


# ------------------------------------------------------------------ backward

def test_backward_before_forward():
    bn = cpubn.BatchNorm(C)
    snap = snapshot(bn)
    with pytest.raises(ValueError, match=r"(?i)forward"):
        bn.backward(np.ones(SHAPE, dtype=np.float32))
    assert_same_state(bn, snap)


@pytest.mark.parametrize("shape", [(4, C, 4), (4, C), (5, C, 5), (4, C, 5, 1)])
def test_backward_dy_shape(primed, shape):
    dy = np.ones(shape)
    primed.expect_failure(ValueError, lambda: primed.bn.backward(dy), match=re.escape(str(shape)))


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16])
def test_backward_dy_dtype(primed, dtype):
    dy = np.ones(SHAPE, dtype=dtype)
    primed.expect_failure((TypeError, ValueError), lambda: primed.bn.backward(dy),
                          match=np.dtype(dtype).name)


def test_backward_dy_garbage(primed):
    primed.expect_failure((TypeError, ValueError), lambda: primed.bn.backward(None))


# ------------------------------------------------------------------ out buffers

def failing_out(primed, out, exc, call, match=None):
    before = np.array(out, copy=True)
    primed.expect_failure(exc, call, match)
    assert bitwise_equal(out, before), "out was written by a failed call"


def test_forward_out_wrong_shape(primed):
    out = np.zeros((4, C, 6))
    failing_out(primed, out, ValueError, lambda: primed.bn.forward(primed.x.copy(), out=out),
                match=re.escape("(4, 3, 6)"))


def test_forward_out_wrong_dtype(primed):
    out = np.zeros(SHAPE, dtype=np.float32)
    failing_out(primed, out, TypeError, lambda: primed.bn.forward(primed.x.copy(), out=out),
                match="float32")


def test_forward_out_read_only(primed):
    out = np.zeros(SHAPE)
    out.flags.writeable = False
    failing_out(primed, out, ValueError, lambda: primed.bn.forward(primed.x.copy(), out=out),
                match=READ_ONLY)


def test_forward_out_partial_overlap(primed):
    """out may be x itself, but not a different view of x's memory."""
    buf = np.concatenate([primed.x.ravel(), np.zeros(C * 5)])
    x = buf[: primed.x.size].reshape(SHAPE)
    out = buf[C * 5:].reshape(SHAPE)
    failing_out(primed, buf, ValueError, lambda: primed.bn.forward(x, out=out), match=r"(?i)overlap")


def test_backward_out_wrong_shape(primed):
    out = np.zeros((4, C, 6))
    failing_out(primed, out, ValueError, lambda: primed.bn.backward(primed.dy, out=out),
                match=re.escape("(4, 3, 6)"))


def test_backward_out_wrong_dtype(primed):
    out = np.zeros(SHAPE, dtype=np.float32)
    failing_out(primed, out, TypeError, lambda: primed.bn.backward(primed.dy, out=out),
                match="float32")


def test_backward_out_read_only(primed):
    out = np.zeros(SHAPE)
    out.flags.writeable = False
    failing_out(primed, out, ValueError, lambda: primed.bn.backward(primed.dy, out=out),
                match=READ_ONLY)


def test_backward_out_is_dy_is_in_place(primed):
    """dx may overwrite dy (an in-place backward): same dx as with a separate out."""
    expected = primed.bn.backward(primed.dy.copy())
    primed.bn.zero_grad()
    dy = primed.dy.copy()
    dx = primed.bn.backward(dy, out=dy)
    assert dx is dy
    assert bitwise_equal(dx, expected)


def test_backward_after_in_place_forward(rng):
    """An in-place forward destroys the input; backward must refuse, not return garbage."""
    bn = cpubn.BatchNorm(C)
    x = rng.standard_normal(SHAPE)
    bn.forward(x, out=x)
    grads = (bn.grad_weight.copy(), bn.grad_bias.copy())
    with pytest.raises(ValueError, match="in-place"):
        bn.backward(np.ones(SHAPE))
    assert bitwise_equal(bn.grad_weight, grads[0]) and bitwise_equal(bn.grad_bias, grads[1])


def test_backward_out_is_saved_x(primed):
    failing_out(primed, primed.x, ValueError, lambda: primed.bn.backward(primed.dy, out=primed.x), match=r"(?i)overlap")


def test_backward_out_overlaps_dy(primed):
    buf = np.concatenate([primed.dy.ravel(), np.zeros(5)])
    dy = buf[: primed.dy.size].reshape(SHAPE)
    out = buf[5:].reshape(SHAPE)
    failing_out(primed, buf, ValueError, lambda: primed.bn.backward(dy, out=out), match=r"(?i)overlap")


def test_functional_out_errors(rng):
    x = make_x(rng, SHAPE, np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError):
        cpubn.batch_norm(x, rm, rv, training=True, out=np.zeros((4, C, 6)))
    with pytest.raises(TypeError):
        cpubn.batch_norm(x, rm, rv, training=True, out=np.zeros(SHAPE, np.float32))
    assert np.all(rm == 0) and np.all(rv == 1), "running stats updated by a failed call"
    mean, invstd = x.mean(axis=(0, 2)), np.ones(C)
    with pytest.raises(ValueError):
        cpubn.batch_norm_backward(x.copy(), x, mean, invstd, out=x)


# ------------------------------------------------------------------ functional parameter shapes

def test_functional_parameter_shapes(rng):
    x = make_x(rng, SHAPE, np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError, match=both(4, C)):
        cpubn.batch_norm(x, rm, rv, weight=np.ones(4), training=True)
    with pytest.raises(ValueError):
        cpubn.batch_norm(x, rm, rv, bias=np.ones(2), training=True)
    assert np.all(rm == 0) and np.all(rv == 1), "running stats updated by a failed call"
    with pytest.raises(ValueError):
        cpubn.batch_norm(x, np.zeros(4), np.ones(4), training=False)
    with pytest.raises(ValueError):
        cpubn.batch_norm_backward(x, x, np.zeros(4), np.ones(C))
    with pytest.raises(ValueError):
        cpubn.batch_norm_backward(x, x, np.zeros(C), np.ones(C), weight=np.ones(2))
    with pytest.raises(ValueError):
        cpubn.batch_norm_backward(x[:, :, :4], x, np.zeros(C), np.ones(C))


def test_functional_bad_hyperparameters_and_params(rng):
    x = make_x(rng, SHAPE, np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError, match=r"-1\.0|-1(?![\d.])"):
        cpubn.batch_norm(x, rm, rv, training=True, eps=-1.0)
    with pytest.raises(ValueError, match=r"2\.0|2(?![\d.])"):
        cpubn.batch_norm(x, rm, rv, training=True, momentum=2.0)
    with pytest.raises(TypeError, match="int64"):
        cpubn.batch_norm(x, rm, rv, weight=np.ones(C, dtype=np.int64), training=True)
    with pytest.raises(TypeError, match="complex128"):
        cpubn.batch_norm(x, rm.astype(complex), rv, training=True)
    assert np.all(rm == 0) and np.all(rv == 1), "running stats updated by a failed call"


# ------------------------------------------------------------------ load_state_dict

def good_state(rng, C=C):
    return {"weight": rng.uniform(0.5, 1.5, C), "bias": rng.uniform(-1, 1, C),
            "running_mean": rng.uniform(-1, 1, C), "running_var": rng.uniform(0.5, 2, C),
            "num_batches_tracked": np.array(9, dtype=np.int64)}


@pytest.mark.parametrize("missing", ["weight", "bias", "running_mean", "running_var"])
def test_load_missing_key(primed, missing, rng):
    sd = good_state(rng)
    del sd[missing]
    primed.expect_failure(ValueError, lambda: primed.bn.load_state_dict(sd), match=missing)


def test_load_without_num_batches_tracked_counts_from_zero(rng):
    """A checkpoint from before PyTorch 0.4.1 has no num_batches_tracked; PyTorch fills
    in 0, and so does cpubn (load_state_dict and load_state_dicts, strict or not)."""
    sd = good_state(rng)
    del sd["num_batches_tracked"]
    bn = cpubn.BatchNorm(C, dtype=np.float64)
    bn.num_batches_tracked = 5
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked == 0 and bitwise_equal(bn.running_var, sd["running_var"])
    model = {f"block.bn.{key}": value for key, value in sd.items()}
    layer = cpubn.BatchNorm(C, dtype=np.float64)
    layer.num_batches_tracked = 5
    result = cpubn.load_state_dicts({"block.bn": layer}, model)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert layer.num_batches_tracked == 0


def test_load_a_list_of_pairs_names_the_mapping(primed, rng):
    pairs = list(good_state(rng).items())
    primed.expect_failure(TypeError, lambda: primed.bn.load_state_dict(pairs), match="mapping")


@pytest.mark.parametrize("count", [np.uint64(2**64 - 1), np.uint64(2**63), np.int64(-1)])
def test_load_num_batches_tracked_beyond_int64(primed, count, rng):
    sd = dict(good_state(rng), num_batches_tracked=count)
    primed.expect_failure(ValueError, lambda: primed.bn.load_state_dict(sd),
                          match="num_batches_tracked")
    # The largest count loads, and the state dict gives it back.
    sd["num_batches_tracked"] = np.uint64(2**63 - 1)
    bn = cpubn.BatchNorm(C, dtype=np.float64)
    bn.load_state_dict(sd)
    assert int(bn.state_dict()["num_batches_tracked"]) == 2**63 - 1


@pytest.mark.parametrize("bad", [-1.0, -np.inf, -1e-30])
def test_load_negative_running_var(primed, bad, rng):
    sd = good_state(rng)
    sd["running_var"][1] = bad
    primed.expect_failure(ValueError, lambda: primed.bn.load_state_dict(sd), match="negative")


def test_load_accepts_what_training_can_give(rng):
    """NaN (training on data with a NaN) and inf (on data near float32's range) load."""
    sd = good_state(rng)
    sd["running_var"][0], sd["running_var"][1], sd["running_mean"][2] = np.nan, np.inf, np.nan
    bn = cpubn.BatchNorm(C, dtype=np.float64)
    bn.load_state_dict(sd)
    assert np.isnan(bn.running_var[0]) and np.isinf(bn.running_var[1])


def test_load_unexpected_key(primed, rng):
    sd = good_state(rng)
    sd["momentum_buffer"] = np.zeros(C)
    primed.expect_failure(ValueError, lambda: primed.bn.load_state_dict(sd), match="momentum_buffer")


def test_load_unexpected_key_no_affine(rng):
    bn = cpubn.BatchNorm(C, affine=False)
    sd = good_state(rng)
    with pytest.raises(ValueError, match="weight"):
        bn.load_state_dict(sd)
    assert bn.num_batches_tracked == 0 and np.all(bn.running_var == 1)


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(C + 1,), (1, C), ()], ids=["longer", "2d", "scalar"])
def test_load_wrong_shape(primed, key, shape, rng):
    sd = good_state(rng)
    sd[key] = np.ones(shape)
    primed.expect_failure(ValueError, lambda: primed.bn.load_state_dict(sd), match=key)


@pytest.mark.parametrize("key", ["weight", "running_var"])
@pytest.mark.parametrize("bad", [np.arange(C), np.ones(C, bool), np.ones(C, complex), np.array(["a"] * C)],
                         ids=["int", "bool", "complex", "str"])
def test_load_wrong_dtype(primed, key, bad, rng):
    sd = good_state(rng)
    sd[key] = bad
    primed.expect_failure((TypeError, ValueError), lambda: primed.bn.load_state_dict(sd), match=key)


def test_load_wrong_num_batches_tracked(primed, rng):
    sd = good_state(rng)
    sd["num_batches_tracked"] = np.array([1, 2])
    primed.expect_failure((TypeError, ValueError), lambda: primed.bn.load_state_dict(sd))


def test_load_not_a_mapping(primed):
    primed.expect_failure((TypeError, ValueError), lambda: primed.bn.load_state_dict(None))


# ------------------------------------------------------------------ failed calls change nothing
def test_read_only_running_mean_raises_before_counting(rng):
    bn = cpubn.BatchNorm(3)
    bn.running_mean.flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        bn(normal_data(rng, (8, 3)))
    assert_same_state(bn, before)
    assert bn.num_batches_tracked == 0


def test_read_only_grad_bias_raises_before_accumulating(rng):
    bn = cpubn.BatchNorm(3)
    y = bn(normal_data(rng, (8, 3)))
    bn.grad_bias.flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        bn.backward(np.ones_like(y))
    assert_same_state(bn, before)
    assert not bn.grad_weight.any()


@pytest.mark.parametrize("name", ["running_mean", "grad_weight"])
def test_list_state_raises_before_any_write(name, rng):
    bn = cpubn.BatchNorm(3)
    y = bn(normal_data(rng, (8, 3)))
    setattr(bn, name, [0.0, 0.0, 0.0])
    count = bn.num_batches_tracked
    with pytest.raises(TypeError, match=name):
        bn(normal_data(rng, (8, 3))) if name == "running_mean" else bn.backward(np.ones_like(y))
    assert bn.num_batches_tracked == count


@pytest.mark.parametrize("call", ["zero_grad", "reset_running_stats", "reset_parameters",
                                  "load_state_dict"])
def test_multi_array_writes_fail_before_the_first(call, rng):
    bn = cpubn.BatchNorm(3)
    y = bn(normal_data(rng, (8, 3)) * 3 + 1)
    bn.backward(np.ones_like(y))
    bn.weight[...] = 2.0
    state = {k: v + 1 for k, v in bn.state_dict().items()}
    last = {"zero_grad": "grad_bias", "reset_running_stats": "running_var",
            "reset_parameters": "running_var", "load_state_dict": "running_var"}[call]
    getattr(bn, last).flags.writeable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match="read-only"):
        getattr(bn, call)(state) if call == "load_state_dict" else getattr(bn, call)()
    assert_same_state(bn, before)


# ------------------------------------------------------------------ out interleaved with x
@pytest.mark.parametrize("axis", [1, -1])
def test_out_interleaved_with_x_is_not_in_place(axis, rng):
    """x and out take alternate columns of one buffer: their extents meet but they share
    no element, so the forward is not in place and backward still has x."""
    buffer = np.zeros((16, 2 * C), np.float32)
    x, out = buffer[:, 0::2], buffer[:, 1::2]
    x[...] = make_x(rng, (16, C), np.float32, axis)
    assert not np.shares_memory(x, out)
    bn, twin = cpubn.BatchNorm(C, axis=axis), cpubn.BatchNorm(C, axis=axis)
    assert bn(x, out=out) is out
    assert bitwise_equal(out, twin(x.copy()))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    assert bitwise_equal(bn.backward(dy), twin.backward(dy))


# ------------------------------------------------------------------ out vs per-channel arrays
def test_functional_out_overlapping_running_mean_raises():
    x = np.random.default_rng(0).standard_normal((8, 3))
    buf = np.zeros((8, 3))
    with pytest.raises(ValueError, match="running_mean"):
        cpubn.batch_norm(x, buf[-1], np.ones(3), training=True, out=buf)
    assert not buf.any()


@pytest.mark.parametrize("name", ["weight", "bias", "running_var"])
def test_functional_out_overlapping_a_parameter_raises(name, rng):
    x = rng.standard_normal((8, 3))
    buf = np.ones((8, 3))
    arrays = {"running_mean": np.zeros(3), "running_var": np.ones(3), "weight": None,
              "bias": None}
    arrays[name] = buf[2]
    with pytest.raises(ValueError, match=name):
        cpubn.batch_norm(x, training=True, out=buf, **arrays)


@pytest.mark.parametrize("name", ["running_mean", "weight", "grad_bias"])
def test_layer_out_overlapping_its_state_raises(name, rng):
    bn = cpubn.BatchNorm(3, dtype=np.float64)
    buf = np.zeros((8, 3))
    setattr(bn, name, buf[0])
    x = rng.standard_normal((8, 3))
    with pytest.raises(ValueError, match=name):
        bn(x, out=buf)
    y = bn(x)
    with pytest.raises(ValueError, match=name):
        bn.backward(np.ones_like(y), out=buf)


# ------------------------------------------------------------------ tiny eps
def test_eps_too_small_for_float32_raises():
    with pytest.raises(ValueError, match="eps"):
        cpubn.BatchNorm(3, eps=1e-78)
    with pytest.raises(ValueError, match="eps"):
        cpubn.batch_norm(np.ones((4, 3)), None, None, training=True, eps=1e-80)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((4, 5, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_smallest_eps_gives_bias_on_a_constant_channel(shape, axis, dtype):
    eps = cpubn._core.validation.EPS_MIN
    bn = cpubn.BatchNorm(3, eps=eps, axis=axis)
    bn.bias[...] = [0.5, -1.0, 2.0]
    x = np.full(shape, 3.0, dtype)
    y = bn(x)
    expected = np.moveaxis(np.broadcast_to(bn.bias, np.moveaxis(x, axis, -1).shape), -1, axis)
    assert np.array_equal(y, expected.astype(dtype))
    dx = bn.backward(np.ones_like(y))
    assert np.isfinite(dx).all()
    bn.eval()
    assert np.isfinite(bn(x)).all()


# ------------------------------------------------------------------ silent acceptances
def test_functional_training_with_list_running_stats_raises():
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="running_mean"):
        cpubn.batch_norm(x, [0.0, 0.0, 0.0], np.ones(3), training=True)
    # read-only use of lists stays fine
    y = cpubn.batch_norm(x, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], training=False)
    assert y.shape == x.shape


@pytest.mark.parametrize("flag", ["no", 1, None, np.float64(1.0)])
def test_training_flag_must_be_bool(flag):
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="training"):
        cpubn.batch_norm_forward(x, training=flag)
    y, mean, invstd = cpubn.batch_norm_forward(x)
    with pytest.raises(TypeError, match="training"):
        cpubn.batch_norm_backward(np.ones_like(y), x, mean, invstd, training=flag)
    with pytest.raises(TypeError, match="mode"):
        cpubn.BatchNorm(3).train(flag)


@pytest.mark.parametrize("axis", [True, False, np.bool_(True)])
def test_bool_axis_is_rejected_everywhere(axis):
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(TypeError, match="axis"):
        cpubn.batch_norm_forward(x, axis=axis)
    with pytest.raises(TypeError, match="axis"):
        cpubn.BatchNorm(3, axis=axis)


def test_masked_arrays_are_rejected():
    x = np.ma.masked_array(np.random.default_rng(0).standard_normal((8, 3)),
                           mask=np.zeros((8, 3), bool))
    with pytest.raises(TypeError, match="masked"):
        cpubn.BatchNorm(3, dtype=np.float64)(x)
    with pytest.raises(TypeError, match="masked"):
        cpubn.batch_norm_forward(x.data, weight=np.ma.masked_array(np.ones(3)))


def test_self_overlapping_out_is_rejected():
    x = np.random.default_rng(0).standard_normal((8, 3))
    broadcast = np.lib.stride_tricks.as_strided(np.zeros(3), shape=(8, 3), strides=(0, 8))
    assert broadcast.flags.writeable
    with pytest.raises(ValueError, match="overlapping"):
        cpubn.batch_norm_forward(x, out=broadcast)
    sliced = np.zeros((16, 6))[::2, ::2]      # gaps, but no overlap: accepted
    assert cpubn.batch_norm_forward(x, out=sliced)[0] is sliced


def test_loading_values_beyond_the_layer_dtype_raises():
    bn = cpubn.BatchNorm(3)
    state = bn.state_dict()
    state["running_var"] = np.array([1.0, 1e300, 1.0])
    with pytest.raises(ValueError, match="range"):
        bn.load_state_dict(state)
    assert np.array_equal(bn.running_var, np.ones(3, np.float32))
    state["running_var"] = np.array([1.0, np.inf, 1.0])     # an inf that is really there
    bn.load_state_dict(state)
    assert np.isinf(bn.running_var[1])
