"""BatchNorm.from_torch and load_state_dicts: layers ported from PyTorch equal their
source (state exactly, outputs to float rounding) in both modes and both layouts."""
import subprocess
import sys

import numpy as np
import pytest

import cpubn

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
TORCH_DTYPE = {} if torch is None else {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def test_import_cpubn_loads_neither_torch_nor_onnx():
    code = ("import sys, cpubn; bad = {'torch', 'onnx'} & set(sys.modules); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- from_torch
def trained_torch_bn(cls_name, shape, dtype, rng, steps=3, **kw):
    """A torch BatchNorm with random affine parameters and non-trivial running statistics."""
    module = getattr(torch.nn, cls_name)(shape[1], dtype=TORCH_DTYPE[dtype], **kw)
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, shape[1]).astype(dtype)))
            module.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, shape[1]).astype(dtype)))
        for _ in range(steps):
            module(torch.from_numpy((rng.standard_normal(shape) * 2 + 1.5).astype(dtype)))
    return module


def torch_forward(module, x, channels_last=False):
    xt = torch.from_numpy(x)
    if channels_last:
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        xt = xt.contiguous(memory_format=fmt)
    with torch.no_grad():
        y = module(xt).numpy()
    return np.moveaxis(y, 1, -1) if channels_last else y


def assert_same_state(layer, module):
    expected = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    got = layer.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


CASES = [("BatchNorm1d", (16, 5)), ("BatchNorm1d", (6, 5, 7)),
         ("BatchNorm2d", (4, 5, 6, 6)), ("BatchNorm3d", (3, 5, 3, 4, 4))]


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls_name,shape", CASES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_from_torch_copies_state_and_matches_both_modes(cls_name, shape, dtype, momentum, rng):
    module = trained_torch_bn(cls_name, shape, dtype, rng, momentum=momentum, eps=1e-3)
    layer = cpubn.BatchNorm.from_torch(module)
    assert (layer.num_features, layer.eps, layer.momentum, layer.axis) == (shape[1], 1e-3,
                                                                           momentum, 1)
    assert layer.dtype == dtype and layer.training
    assert layer.num_batches_tracked == 3
    assert_same_state(layer, module)

    x = (rng.standard_normal(shape) * 2 + 1.5).astype(dtype)
    np.testing.assert_allclose(layer(x), torch_forward(module, x), **TOL[dtype])
    assert_state_close(layer, module, dtype)           # the same running-stat update

    module.eval()
    layer = cpubn.BatchNorm.from_torch(module)
    assert not layer.training
    np.testing.assert_allclose(layer(x), torch_forward(module, x), **TOL[dtype])


def assert_state_close(layer, module, dtype):
    for key, value in module.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[key], value.numpy(), **TOL[dtype],
                                   err_msg=key)


@needs_torch
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_from_torch_without_affine_or_running_stats(affine, track, rng):
    module = trained_torch_bn("BatchNorm2d", (4, 3, 5, 5), np.float32, rng, affine=affine,
                              track_running_stats=track)
    module.eval()
    layer = cpubn.BatchNorm.from_torch(module)
    assert (layer.affine, layer.track_running_stats) == (affine, track)
    assert_same_state(layer, module)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), torch_forward(module, x), **TOL[np.float32])


@needs_torch
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (2, 6, 3, 4, 4)])
def test_from_torch_channels_last(shape, rng):
    cls_name = "BatchNorm2d" if len(shape) == 4 else "BatchNorm3d"
    module = trained_torch_bn(cls_name, shape, np.float32, rng).eval()
    layer = cpubn.BatchNorm.from_torch(module, axis=-1)
    x_last = np.ascontiguousarray(np.moveaxis(
        (rng.standard_normal(shape) + 1).astype(np.float32), 1, -1))
    np.testing.assert_allclose(layer(x_last), torch_forward(module, x_last, channels_last=True),
                               **TOL[np.float32])


@needs_torch
def test_from_torch_fused_relu(rng):
    module = trained_torch_bn("BatchNorm2d", (4, 3, 5, 5), np.float32, rng).eval()
    layer = cpubn.BatchNorm.from_torch(module, activation="relu")
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), np.maximum(torch_forward(module, x), 0),
                               **TOL[np.float32])


@needs_torch
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_from_torch_half_parameters_widen_exactly(half, rng):
    module = trained_torch_bn("BatchNorm1d", (8, 4), np.float32, rng)
    module = module.to(getattr(torch, half))
    layer = cpubn.BatchNorm.from_torch(module)
    assert layer.dtype == np.float32
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(layer, key),
                                      getattr(module, key).detach().float().numpy())


@needs_torch
def test_from_torch_sync_and_lazy_modules(rng):
    sync = torch.nn.SyncBatchNorm(7, momentum=0.2)
    with torch.no_grad():
        sync.running_mean.uniform_(-1, 1)
        sync.num_batches_tracked += 5
    layer = cpubn.BatchNorm.from_torch(sync)
    assert layer.momentum == 0.2 and layer.num_batches_tracked == 5
    assert_same_state(layer, sync)

    lazy = torch.nn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="has not seen an input"):
        cpubn.BatchNorm.from_torch(lazy)
    lazy(torch.randn(2, 3, 4, 4))
    assert cpubn.BatchNorm.from_torch(lazy).num_features == 3


@needs_torch
def test_from_torch_copies_arrays_and_rejects_other_modules(rng):
    module = trained_torch_bn("BatchNorm1d", (8, 4), np.float32, rng)
    layer = cpubn.BatchNorm.from_torch(module)
    before = layer.running_mean.copy()
    with torch.no_grad():
        module.running_mean += 1
    np.testing.assert_array_equal(layer.running_mean, before)
    with pytest.raises(TypeError, match="Linear"):
        cpubn.BatchNorm.from_torch(torch.nn.Linear(2, 2))


def test_from_torch_rejects_a_non_module():
    with pytest.raises(TypeError, match="ndarray"):
        cpubn.BatchNorm.from_torch(np.zeros(3))


@needs_torch
def test_from_torch_keeps_the_subclass_and_its_arguments(rng):
    module = trained_torch_bn("BatchNorm2d", (4, 3, 5, 5), np.float32, rng)
    layer = cpubn.GhostBatchNorm.from_torch(module, ghost_batch_size=2)
    assert type(layer) is cpubn.GhostBatchNorm
    assert_same_state(layer, module)


# ----------------------------------------------------------------------------- load_state_dicts
def model_state(rng, bn_paths=("stem.1", "block.0.bn1", "block.0.bn2"), channels=(3, 4, 5)):
    """A whole-model state dict as PyTorch writes it: BatchNorms among other layers."""
    state = {"stem.0.weight": rng.standard_normal((3, 2, 3, 3)).astype(np.float32)}
    for path, c in zip(bn_paths, channels):
        state[f"{path}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{path}.bias"] = rng.standard_normal(c).astype(np.float32)
        state[f"{path}.running_mean"] = rng.standard_normal(c).astype(np.float32)
        state[f"{path}.running_var"] = rng.uniform(0.5, 2, c).astype(np.float32)
        state[f"{path}.num_batches_tracked"] = np.array(c * 10, np.int64)
        state[f"{path.rpartition('.')[0]}.conv.weight"] = np.zeros((c, c, 1, 1), np.float32)
    return state


def assert_loaded(layer, state, path):
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[f"{path}.{key}"], err_msg=f"{path}.{key}")


def test_load_state_dicts_by_path_and_in_order(rng):
    state = model_state(rng)
    layers = {"stem.1": cpubn.BatchNorm(3), "block.0.bn1": cpubn.BatchNorm(4),
              "block.0.bn2": cpubn.BatchNorm(5, axis=-1)}
    assert cpubn.load_state_dicts(layers, state) == ([], [])
    for path, layer in layers.items():
        assert_loaded(layer, state, path)
    ordered = [cpubn.BatchNorm(3), cpubn.BatchNorm(4), cpubn.BatchNorm(5)]
    cpubn.load_state_dicts(ordered, state)
    for path, layer in zip(layers, ordered):
        assert_loaded(layer, state, path)


def test_load_state_dicts_prefix_map(rng):
    state = model_state(rng)
    layers = {"stem_bn": cpubn.BatchNorm(3), "bn1": cpubn.BatchNorm(4),
              "block.0.bn2": cpubn.BatchNorm(5)}
    cpubn.load_state_dicts(layers, state, prefix_map={"stem_bn": "stem.1", "bn1": "block.0.bn1"})
    assert_loaded(layers["stem_bn"], state, "stem.1")
    assert_loaded(layers["bn1"], state, "block.0.bn1")
    with pytest.raises(ValueError, match="not in layers"):
        cpubn.load_state_dicts(layers, state, prefix_map={"nope": "stem.1"})


def test_load_state_dicts_strict_reports_and_changes_nothing(rng):
    state = model_state(rng)
    del state["block.0.bn1.running_var"]
    state["stem.1.extra"] = np.zeros(3, np.float32)
    layers = {"stem.1": cpubn.BatchNorm(3), "block.0.bn1": cpubn.BatchNorm(4)}
    # block.0.bn2 is a BatchNorm of the model that no layer receives: unexpected too.
    with pytest.raises(ValueError, match="block.0.bn1.running_var") as info:
        cpubn.load_state_dicts(layers, state)
    assert "stem.1.extra" in str(info.value) and "block.0.bn2.running_mean" in str(info.value)
    for layer in layers.values():
        np.testing.assert_array_equal(layer.running_mean, 0)

    result = cpubn.load_state_dicts(layers, state, strict=False)
    assert result.missing_keys == ["block.0.bn1.running_var"]
    assert "stem.1.extra" in result.unexpected_keys
    assert "stem.0.weight" not in result.unexpected_keys      # not a BatchNorm's entry
    assert_loaded(layers["stem.1"], state, "stem.1")
    bn1 = layers["block.0.bn1"]
    np.testing.assert_array_equal(bn1.running_mean, state["block.0.bn1.running_mean"])
    np.testing.assert_array_equal(bn1.running_var, 1)          # kept its own value


def test_load_state_dicts_failed_value_check_leaves_every_layer_unchanged(rng):
    state = model_state(rng)
    state["block.0.bn2.running_var"] = np.ones(7, np.float32)   # wrong length, last layer
    layers = [cpubn.BatchNorm(3), cpubn.BatchNorm(4), cpubn.BatchNorm(5)]
    with pytest.raises(ValueError, match="shape"):
        cpubn.load_state_dicts(layers, state)
    for layer in layers:
        np.testing.assert_array_equal(layer.weight, 1)
        assert layer.num_batches_tracked == 0


def test_load_state_dicts_materializes_lazy_layers_or_restores_them(rng):
    state = model_state(rng)
    lazy = cpubn.LazyBatchNorm()
    cpubn.load_state_dicts({"stem.1": lazy, "block.0.bn1": cpubn.BatchNorm(4),
                            "block.0.bn2": cpubn.BatchNorm(5)}, state)
    assert lazy.num_features == 3
    state["block.0.bn2.weight"] = np.ones(2, np.float32)
    lazy = cpubn.LazyBatchNorm()
    with pytest.raises(ValueError):
        cpubn.load_state_dicts({"stem.1": lazy, "block.0.bn1": cpubn.BatchNorm(4),
                                "block.0.bn2": cpubn.BatchNorm(5)}, state)
    assert lazy.has_uninitialized_params()


def test_load_state_dicts_list_must_match_the_batchnorm_count(rng):
    with pytest.raises(ValueError, match="3 BatchNorms"):
        cpubn.load_state_dicts([cpubn.BatchNorm(3)], model_state(rng))
    with pytest.raises(ValueError, match="both load"):
        cpubn.load_state_dicts({"a": cpubn.BatchNorm(3), "stem.1": cpubn.BatchNorm(3)},
                               model_state(rng), prefix_map={"a": "stem.1"})


@needs_torch
def test_load_state_dicts_from_a_torch_model(rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(3)))
    with torch.no_grad():
        for _ in range(3):
            model[1](torch.randn(8, 4, 5, 5) * 3 + 2)
            model[3][1](torch.randn(8, 3, 6) - 1)
    layers = {"1": cpubn.BatchNorm(4), "3.1": cpubn.BatchNorm(3)}
    assert cpubn.load_state_dicts(layers, model.state_dict()) == ([], [])
    assert_same_state(layers["1"], model[1])
    assert_same_state(layers["3.1"], model[3][1])
