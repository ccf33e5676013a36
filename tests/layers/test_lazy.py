"""LazyBatchNorm: num_features from the first input, then exactly a BatchNorm."""
import numpy as np
import pytest

import cpubn
from bn_testing import bitwise_equal, make_x, randomize
from cpubn._layers.lazy import LazyBatchNorm

PER_CHANNEL = ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var")
CONFIGS = [dict(), dict(affine=False), dict(track_running_stats=False),
           dict(affine=False, track_running_stats=False),
           dict(momentum=None, eps=1e-3, dtype=np.float64), dict(axis=-1)]


def assert_unmaterialized(bn):
    assert bn.has_uninitialized_params()
    assert bn.num_features is None
    for name in PER_CHANNEL:
        assert getattr(bn, name) is None, name
    assert repr(bn).startswith("LazyBatchNorm(")


def assert_same_layer(lazy, plain):
    """Same hyperparameters, mode and state, bit for bit."""
    assert lazy._config() == plain._config()
    assert lazy.training == plain.training
    assert lazy.num_batches_tracked == plain.num_batches_tracked
    for name in PER_CHANNEL:
        a, b = getattr(lazy, name), getattr(plain, name)
        assert (a is None and b is None) or bitwise_equal(a, b), name


def data(rng, shape, axis=1, dtype=np.float32):
    return make_x(rng, shape, dtype, axis)


# ---------------------------------------------------------------------- behaves as BatchNorm
def config_id(config):
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_batchnorm_after_first_forward(config, rng):
    axis = config.get("axis", 1)
    shape = (4, 5, 3) if axis == 1 else (4, 3, 5)
    lazy = LazyBatchNorm(**config)
    plain = cpubn.BatchNorm(5, **config)
    assert_unmaterialized(lazy)
    for step in range(3):
        x = data(rng, shape, axis)
        assert bitwise_equal(lazy(x), plain(x))
        dy = rng.standard_normal(shape).astype(np.float32)
        assert bitwise_equal(lazy.backward(dy), plain.backward(dy))
        assert_same_layer(lazy, plain)
    assert lazy.num_features == 5 and not lazy.has_uninitialized_params()
    x = data(rng, shape, axis)
    assert bitwise_equal(lazy.eval()(x), plain.eval()(x))
    assert repr(lazy) == repr(plain)
    assert isinstance(lazy, cpubn.BatchNorm)


@pytest.mark.parametrize("axis,shape,expected", [(1, (2, 7), 7), (-1, (2, 3, 4, 6), 6),
                                                 (2, (2, 3, 4, 5), 4), (0, (3, 2), 3)])
def test_num_features_from_axis(axis, shape, expected, rng):
    lazy = LazyBatchNorm(axis=axis)
    lazy(data(rng, shape, axis))
    assert lazy.num_features == expected
    assert lazy.weight.shape == lazy.running_mean.shape == (expected,)
    assert lazy.weight.dtype == np.float32


def test_later_inputs_must_match(rng):
    lazy = LazyBatchNorm()
    lazy(data(rng, (4, 3)))
    with pytest.raises(ValueError, match="expected num_features=3"):
        lazy(data(rng, (4, 5)))
    assert lazy.num_features == 3


def test_mode_chosen_before_first_forward_is_kept(rng):
    lazy = LazyBatchNorm(eps=1e-3).eval()
    x = data(rng, (1, 4, 2))   # a single value per channel is fine with running statistics
    y = lazy(x)
    assert not lazy.training and lazy.num_batches_tracked == 0
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    assert bitwise_equal(lazy.running_mean, np.zeros(4, np.float32))


def test_hyperparameters_changed_before_first_forward_are_used(rng):
    lazy = LazyBatchNorm()
    lazy.momentum = 0.5
    x = data(rng, (6, 3))
    lazy(x)
    plain = cpubn.BatchNorm(3, momentum=0.5)
    plain(x)
    assert_same_layer(lazy, plain)


# ---------------------------------------------------------------------- bad first inputs
@pytest.mark.parametrize("bad,error,match", [
    (np.ones(4, np.float32), ValueError, "at least 2 dimensions"),
    (np.ones((4, 3), np.int64), TypeError, "float32, float64, float16"),
    (np.ones((4, 0), np.float32), ValueError, "no features"),
    (np.ones((1, 3), np.float32), ValueError, "more than 1 value per channel"),
    ("text", TypeError, "float32, float64, float16"),
], ids=["1d", "int", "no-features", "one-value", "str"])
def test_bad_first_input_leaves_it_unmaterialized(bad, error, match, rng):
    lazy = LazyBatchNorm()
    with pytest.raises(error, match=match):
        lazy(bad)
    assert_unmaterialized(lazy)
    assert lazy.num_batches_tracked == 0
    lazy(data(rng, (4, 2)))
    assert lazy.num_features == 2 and lazy.num_batches_tracked == 1


def test_bad_axis_or_out_leaves_it_unmaterialized(rng):
    lazy = LazyBatchNorm(axis=3)
    with pytest.raises(ValueError, match="out of range"):
        lazy(data(rng, (4, 3)))
    assert_unmaterialized(lazy)
    lazy = LazyBatchNorm()
    x = data(rng, (4, 3))
    partial = np.empty(14, np.float32)
    x_in_buffer, out_shifted = partial[:12].reshape(4, 3), partial[2:].reshape(4, 3)
    x_in_buffer[...] = x
    for out, error in ((np.empty((4, 2), np.float32), ValueError),
                       (np.empty((4, 3), np.float64), TypeError)):
        with pytest.raises(error):
            lazy(x, out=out)
        assert_unmaterialized(lazy)
        assert lazy.num_batches_tracked == 0
    with pytest.raises(ValueError, match="overlap"):       # out partially overlapping x
        lazy(x_in_buffer, out=out_shifted)
    assert_unmaterialized(lazy)
    out = np.empty_like(x)
    assert lazy(x, out=out) is out


def test_bad_hyperparameters_rejected_at_construction():
    with pytest.raises(ValueError, match="eps"):
        LazyBatchNorm(eps=0)
    with pytest.raises(ValueError, match="momentum"):
        LazyBatchNorm(momentum=1.5)
    with pytest.raises(TypeError, match="axis"):
        LazyBatchNorm(axis="1")
    with pytest.raises(TypeError, match="dtype"):
        LazyBatchNorm(dtype=np.int32)
    with pytest.raises(TypeError, match="positional"):
        LazyBatchNorm(64)   # meant as num_features; positionally it would be eps


# ---------------------------------------------------------------------- before materialization
def test_before_first_forward():
    lazy = LazyBatchNorm()
    assert_unmaterialized(lazy)
    assert lazy.num_batches_tracked == 0
    with pytest.raises(ValueError, match="before any forward"):
        lazy.backward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="state_dict\\(\\).*not inferred num_features"):
        lazy.state_dict()
    lazy.zero_grad()
    lazy.reset_parameters()
    lazy.reset_running_stats()
    assert lazy.train() is lazy and lazy.eval() is lazy and not lazy.training
    assert_unmaterialized(lazy)
    assert LazyBatchNorm(track_running_stats=False).num_batches_tracked is None


def test_stateless_config_has_empty_state_dict():
    lazy = LazyBatchNorm(affine=False, track_running_stats=False)
    assert lazy.state_dict() == {}
    lazy.load_state_dict({})
    assert_unmaterialized(lazy)
    with pytest.raises(ValueError, match="unexpected keys \\['weight'\\]"):
        lazy.load_state_dict({"weight": np.ones(3, np.float32)})


def test_repr_before_and_after(rng):
    lazy = LazyBatchNorm()
    assert repr(lazy) == ("LazyBatchNorm(eps=1e-05, momentum=0.1, affine=True, "
                          "track_running_stats=True, axis=1)")
    other = LazyBatchNorm(eps=1e-3, momentum=None, affine=False, track_running_stats=False,
                          axis=-1)
    assert repr(other) == ("LazyBatchNorm(eps=0.001, momentum=None, affine=False, "
                           "track_running_stats=False, axis=-1)")
    lazy(data(rng, (4, 8)))
    assert repr(lazy) == repr(cpubn.BatchNorm(8))


# ---------------------------------------------------------------------- state dicts and files
@pytest.mark.parametrize("affine,track", [(True, True), (True, False), (False, True)])
def test_load_state_dict_infers_num_features(affine, track, rng):
    source = randomize(cpubn.BatchNorm(6, affine=affine, track_running_stats=track), rng)
    if track:
        source(data(rng, (4, 6)))
    lazy = LazyBatchNorm(affine=affine, track_running_stats=track)
    lazy.load_state_dict(source.state_dict())
    assert lazy.num_features == 6
    lazy.eval(), source.eval()
    x = data(rng, (3, 6))
    assert bitwise_equal(lazy(x), source(x))
    for key, value in source.state_dict().items():
        assert bitwise_equal(lazy.state_dict()[key], value), key


def test_load_torch_style_state_dict_before_forward():
    # What torch.nn.BatchNorm2d(4).state_dict() gives after .numpy(): float32 arrays and a
    # 0-d int64 count.  (No torch import here: it is slow, and test_state covers torch.)
    state = {"weight": np.full(4, 2.0, np.float32), "bias": np.zeros(4, np.float32),
             "running_mean": np.arange(4, dtype=np.float32),
             "running_var": np.full(4, 3.0, np.float32),
             "num_batches_tracked": np.array(7, dtype=np.int64)}
    lazy = LazyBatchNorm()
    lazy.load_state_dict(state)
    assert lazy.num_features == 4 and lazy.num_batches_tracked == 7
    np.testing.assert_array_equal(lazy.running_mean, state["running_mean"])
    y = lazy.eval()(np.ones((2, 4), np.float32))
    np.testing.assert_allclose(y[0], 2 * (1 - np.arange(4)) / np.sqrt(3 + 1e-5), rtol=1e-6)


def full_state(channels=3, **changes):
    """A complete state dict of a default BatchNorm(channels), with some entries replaced
    (None removes the entry)."""
    state = {"weight": np.ones(channels), "bias": np.zeros(channels),
             "running_mean": np.zeros(channels), "running_var": np.ones(channels),
             "num_batches_tracked": np.array(0)}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize("state,error,match", [
    (full_state(bias=None), ValueError, "missing keys \\['bias'\\]"),
    (full_state(extra=np.ones(3)), ValueError, "unexpected keys \\['extra'\\]"),
    (full_state(bias=np.ones(4)), ValueError, "'bias' has shape \\(4,\\), expected \\(3,\\)"),
    (full_state(weight=np.ones((3, 1))), ValueError, "'weight' has shape \\(3, 1\\)"),
    (full_state(0), ValueError, "num_features >= 1"),
    (full_state(weight=np.ones(3, int)), TypeError, "float array"),
    (full_state(num_batches_tracked=np.array(-1)), ValueError, r"from 0 to 2\*\*63"),
    ({"num_batches_tracked": np.array(0)}, ValueError, "missing keys"),
], ids=["missing", "unexpected", "lengths-differ", "2d", "zero-length", "int",
        "negative-count", "no-arrays"])
def test_bad_state_dict_leaves_it_unmaterialized(state, error, match, rng):
    lazy = LazyBatchNorm()
    with pytest.raises(error, match=match):
        lazy.load_state_dict(state)
    assert_unmaterialized(lazy)
    assert lazy.num_batches_tracked == 0
    lazy(data(rng, (4, 2)))
    assert lazy.num_features == 2


def test_load_state_dict_after_materialization_is_batchnorm_s(rng):
    lazy = LazyBatchNorm()
    lazy(data(rng, (4, 3)))
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        lazy.load_state_dict(cpubn.BatchNorm(5).state_dict())
    assert lazy.num_features == 3


def test_save_and_load(tmp_path, rng):
    lazy = LazyBatchNorm(momentum=0.3, axis=-1, dtype=np.float64)
    with pytest.raises(ValueError, match="save\\(\\).*not inferred num_features"):
        lazy.save(tmp_path / "early")
    assert not list(tmp_path.iterdir())
    lazy(data(rng, (4, 2, 5), axis=-1))
    lazy.eval()
    path = tmp_path / "bn.npz"
    lazy.save(path)
    for loaded in (LazyBatchNorm.load(path), cpubn.BatchNorm.load(path)):
        assert_same_layer(loaded, lazy)
        x = data(rng, (3, 5), axis=-1)
        assert bitwise_equal(loaded(x), lazy(x))
    assert type(LazyBatchNorm.load(path)) is LazyBatchNorm
    plain_path = tmp_path / "plain.npz"
    cpubn.BatchNorm(4).save(plain_path)
    assert LazyBatchNorm.load(plain_path).num_features == 4
