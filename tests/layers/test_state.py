"""state_dict / load_state_dict / save / load round trips."""

import os
import zipfile

import numpy as np
import pytest

import cpubn
from bn_testing import DTYPES, assert_close, bitwise_equal, make_x, randomize
from reference import RefBatchNorm

ALL_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def batch_for(bn, rng):
    shape = [4, 2, 3]
    shape[bn.axis % 3] = bn.num_features
    return make_x(rng, tuple(shape), np.float32, bn.axis)


def trained(rng, C=3, steps=3, **kw):
    bn = randomize(cpubn.BatchNorm(C, **kw), rng)
    for _ in range(steps):
        bn(batch_for(bn, rng))
    return bn


@pytest.mark.parametrize("affine,track", [(True, True), (True, False), (False, True), (False, False)])
def test_state_dict_keys(affine, track):
    sd = cpubn.BatchNorm(3, affine=affine, track_running_stats=track).state_dict()
    expected = set()
    if affine:
        expected |= {"weight", "bias"}
    if track:
        expected |= {"running_mean", "running_var", "num_batches_tracked"}
    assert set(sd) == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_state_dict_values_are_copies(dtype, rng):
    bn = trained(rng, dtype=dtype)
    sd = bn.state_dict()
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert sd[k].dtype == dtype and bitwise_equal(sd[k], getattr(bn, k)), k
    nbt = sd["num_batches_tracked"]
    assert isinstance(nbt, np.ndarray) and nbt.shape == () and nbt.dtype == np.int64 and nbt == 3
    before = {k: np.array(v, copy=True) for k, v in sd.items()}
    for k in ("weight", "bias", "running_mean", "running_var"):
        sd[k][...] = 42.0
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert bitwise_equal(getattr(bn, k), before[k]), f"state_dict()[{k!r}] aliases the object"


@pytest.mark.parametrize("src_dtype,dst_dtype", [(np.float32, np.float32), (np.float64, np.float32),
                                                 (np.float32, np.float64)])
def test_load_state_dict_round_trip(src_dtype, dst_dtype, rng):
    src = trained(rng, dtype=src_dtype)
    dst = cpubn.BatchNorm(3, dtype=dst_dtype)
    dst.load_state_dict(src.state_dict())
    for k in ("weight", "bias", "running_mean", "running_var"):
        got = getattr(dst, k)
        assert got.dtype == dst_dtype, k
        assert bitwise_equal(got, getattr(src, k).astype(dst_dtype)), k
    assert dst.num_batches_tracked == 3
    # Loading copies: later changes to the source do not leak in.
    src.weight[...] = 7.0
    assert not np.any(dst.weight == 7.0)


def test_load_state_dict_python_int_and_plain_arrays(rng):
    bn = cpubn.BatchNorm(2)
    bn.load_state_dict({"weight": np.array([2.0, 3.0]), "bias": np.array([0.5, -0.5]),
                        "running_mean": np.array([1.0, 2.0]), "running_var": np.array([4.0, 9.0]),
                        "num_batches_tracked": 5})
    assert bn.num_batches_tracked == 5
    bn.eval()
    x = make_x(rng, (3, 2), np.float32)
    expected = (x.astype(np.float64) - [1.0, 2.0]) / np.sqrt(np.array([4.0, 9.0]) + 1e-5) * [2, 3] + [0.5, -0.5]
    assert_close(bn(x), expected, np.float32)
    # Training continues counting from the loaded value.
    bn.train()(x)
    assert bn.num_batches_tracked == 6


def test_load_state_dict_keeps_hyperparameters(rng):
    bn = cpubn.BatchNorm(3, eps=1e-3, momentum=None, axis=-1, dtype=np.float64).eval()
    bn.load_state_dict(trained(rng).state_dict())
    assert (bn.eps, bn.momentum, bn.axis, bn.training) == (1e-3, None, -1, False)
    assert np.dtype(bn.dtype) == np.float64


CONFIGS = [
    dict(),
    dict(momentum=None, dtype=np.float64, eps=1e-3),
    dict(affine=False, axis=-1),
    dict(track_running_stats=False, momentum=0.0),
    dict(affine=False, track_running_stats=False, axis=0, momentum=1.0, dtype=np.float64),
]


def attributes(bn):
    names = ("num_features", "eps", "momentum", "affine", "track_running_stats", "axis",
             "training", "num_batches_tracked")
    return {n: getattr(bn, n) for n in names} | {"dtype": np.dtype(bn.dtype)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_save_load_round_trip(config, training, tmp_path, rng):
    bn = trained(rng, **config).train(training)
    path = tmp_path / "bn.npz"
    bn.save(path)
    loaded = cpubn.BatchNorm.load(path)
    assert isinstance(loaded, cpubn.BatchNorm)
    a, b = attributes(bn), attributes(loaded)
    assert a == b
    # Types matter too: momentum=None stays None, ints stay ints, floats stay floats.
    for k in a:
        assert type(a[k]) is type(b[k]) or (isinstance(a[k], (int, np.integer))
                                            and isinstance(b[k], (int, np.integer))), k
    for k in ("weight", "bias", "running_mean", "running_var"):
        va, vb = getattr(bn, k), getattr(loaded, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            assert bitwise_equal(va, vb), k
    # The loaded object computes what the reference says the saved one does.
    x = batch_for(loaded, rng)
    expected = RefBatchNorm.like(loaded)
    assert_close(loaded(x), expected(x), np.float32)


def test_save_load_str_path(tmp_path, rng):
    bn = trained(rng, momentum=None)
    path = str(tmp_path / "model.npz")
    bn.save(path)
    loaded = cpubn.BatchNorm.load(path)
    assert loaded.momentum is None and loaded.num_batches_tracked == 3
    assert bitwise_equal(loaded.running_var, bn.running_var)


@pytest.mark.parametrize("steps", [0, 4])
def test_load_torch_state_dict(steps):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tbn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-1, 1)
    for _ in range(steps):
        tbn(torch.randn(4, 5, 3, 3) * 2 + 1)
    sd = {k: v.detach().numpy() for k, v in tbn.state_dict().items()}
    bn = cpubn.BatchNorm(5)
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked == steps
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert bitwise_equal(getattr(bn, k), sd[k]), k
    tbn.eval()
    bn.eval()
    x = torch.randn(2, 5, 3, 3)
    with torch.no_grad():
        y_t = tbn(x).numpy()
    y = bn(x.numpy())
    np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=1e-5)
    # And back: our state dict loads into torch.
    tbn2 = torch.nn.BatchNorm2d(5)
    tbn2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    assert int(tbn2.num_batches_tracked) == steps
    assert torch.equal(tbn2.running_var, tbn.running_var)


# ------------------------------------------------------------------ load() of bad files
def _saved(tmp_path):
    bn = cpubn.BatchNorm(4)
    bn(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    path = tmp_path / "bn"
    bn.save(path)
    return bn, tmp_path / "bn.npz"


def test_save_and_load_take_the_same_path(tmp_path):
    bn, _ = _saved(tmp_path)
    restored = cpubn.BatchNorm.load(tmp_path / "bn")
    for key, value in bn.state_dict().items():
        assert np.array_equal(restored.state_dict()[key], value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        cpubn.BatchNorm.load(tmp_path / "nothing.npz")


def _rewrite(path, drop=(), **replace):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    arrays.update(replace)
    np.savez(path, **arrays)


BAD_FILES = {
    "random bytes": lambda p: p.write_bytes(os.urandom(300)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:200]),
    "empty zip": lambda p: zipfile.ZipFile(p, "w").close(),
    "numpy array": lambda p: np.save(open(p, "wb"), np.zeros(3)),
    "no config": lambda p: _rewrite(p, drop=("config",)),
    "config not json": lambda p: _rewrite(p, config=np.array("{not json")),
    "config a list": lambda p: _rewrite(p, config=np.array("[1, 2]")),
    "wrong format": lambda p: _rewrite(p, config=np.array('{"format": 7}')),
    "unknown hyperparameter": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": 4, "colour": "red"}')),
    "bad hyperparameter": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": -4}')),
    "training not bool": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": "yes", "num_features": 4}')),
    "missing state": lambda p: _rewrite(p, drop=("running_var",)),
    "wrong state shape": lambda p: _rewrite(p, weight=np.ones(5, np.float32)),
    "object array": lambda p: _rewrite(p, weight=np.array([object()] * 4)),
    "other layer": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": 4, "layer": "GhostOfBatchNorm"}')),
    # A crafted num_features: checked against the file's arrays before the layer is built
    # (it used to allocate that many values per array first: a MemoryError here, an OOM
    # kill for smaller crafted values, which are not tested for that reason).
    "huge num_features": lambda p: _rewrite(p, config=np.array(
        '{"format": 1, "training": true, "num_features": 35184372088832}')),
}


@pytest.mark.parametrize("damage", sorted(BAD_FILES))
def test_bad_file_raises_value_error_naming_it(damage, tmp_path):
    _, path = _saved(tmp_path)
    try:
        BAD_FILES[damage](path)
    except ValueError:                      # np.savez refuses object arrays: write by hand
        pytest.skip("numpy refuses to write this damage")
    with pytest.raises(ValueError, match="bn.npz"):
        cpubn.BatchNorm.load(path)
