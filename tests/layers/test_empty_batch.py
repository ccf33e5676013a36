"""An empty batch (a zero-length axis other than the feature axis, e.g. a data loader's
empty last batch) is taken as PyTorch takes it, by every layer and the functional API in
both layouts: an empty output; in training the batch is counted but moves no running
statistic; backward gives an empty dx and adds nothing to the parameter gradients."""
import numpy as np
import pytest

import cpubn
from bn_testing import assert_same_state, bitwise_equal, snapshot

C = 3
SHAPES = {1: [(0, C, 5), (4, C, 0), (0, C)], -1: [(0, 5, C), (4, 0, C), (0, C)]}
CASES = [(axis, shape) for axis, shapes in SHAPES.items() for shape in shapes]
LAYERS = {
    "BatchNorm": lambda axis: cpubn.BatchNorm(C, axis=axis),
    "BatchRenorm": lambda axis: cpubn.BatchRenorm(C, axis=axis),
    "GhostBatchNorm": lambda axis: cpubn.GhostBatchNorm(C, 2, axis=axis),
    "relu": lambda axis: cpubn.BatchNorm(C, axis=axis, activation="relu"),
}


def _trained(make, axis, rng):
    layer = make(axis)
    shape = (6, C) if axis == -1 else (6, C, 2)
    x = rng.standard_normal(shape).astype(np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    return layer


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("axis,shape", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_layer_takes_an_empty_batch(kind, axis, shape, training, rng):
    layer = _trained(LAYERS[kind], axis, rng).train(training)
    before = snapshot(layer)
    x = np.ones(shape, np.float32)
    y = layer(x)
    assert y.shape == shape and y.dtype == np.float32
    after = snapshot(layer)
    assert after.pop("num_batches_tracked") == before.pop("num_batches_tracked") + training
    for name, value in before.items():
        assert value is None or after[name] is None or bitwise_equal(after[name], value), name
    dx = layer.backward(np.ones(shape, np.float32))
    assert dx.shape == shape
    assert bitwise_equal(layer.grad_weight, before["grad_weight"])
    out = np.empty(shape, np.float32)
    assert layer(x, out=out) is out


def test_an_empty_batch_with_a_residual_and_out(rng):
    layer = _trained(LAYERS["relu"], 1, rng)
    x = np.ones((0, C, 4), np.float32)
    out = np.empty_like(x)
    assert layer(x, out=out, residual=np.zeros_like(x)) is out
    dx, dresidual = layer.backward(np.ones_like(x))
    assert dx.shape == dresidual.shape == x.shape
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.ones((0, C, 5), np.float32))          # dy must match the input
    with pytest.raises(ValueError, match="shape"):
        layer(x, residual=np.zeros((0, C, 5), np.float32))       # still checked


def test_a_lazy_layer_materializes_from_an_empty_batch():
    lazy = cpubn.LazyBatchNorm()
    assert lazy(np.ones((0, 4, 2), np.float32)).shape == (0, 4, 2)
    assert lazy.num_features == 4 and lazy.num_batches_tracked == 1


@pytest.mark.parametrize("axis,shape", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_functional_api_takes_an_empty_batch(axis, shape, training):
    rm, rv = np.full(C, 0.5), np.full(C, 4.0)
    x = np.ones(shape)
    y, mean, invstd = cpubn.batch_norm_forward(x, None, None, rm, rv, training=training,
                                               axis=axis, eps=1e-5)
    assert y.shape == shape and (rm == 0.5).all() and (rv == 4.0).all()
    if training:
        assert np.isnan(mean).all() and np.isnan(invstd).all()
    else:
        assert (mean == 0.5).all() and (invstd == 1 / np.sqrt(4.0 + 1e-5)).all()
    dx, dweight, dbias = cpubn.batch_norm_backward(np.ones(shape), x, mean, invstd,
                                                   np.ones(C), training=training, axis=axis)
    assert dx.shape == shape and not dweight.any() and not dbias.any()
    assert dweight.dtype == np.float64


def test_matches_pytorch_on_an_empty_batch(rng):
    torch = pytest.importorskip("torch")
    for shape in [(0, C, 4, 4), (0, C)]:
        module = torch.nn.BatchNorm2d(C) if len(shape) == 4 else torch.nn.BatchNorm1d(C)
        layer = cpubn.BatchNorm.from_torch(module)
        x = torch.zeros(shape, requires_grad=True)
        y_t = module(x)
        y_t.sum().backward()
        y = layer(np.zeros(shape, np.float32))
        layer.backward(np.ones(shape, np.float32))
        assert y.shape == tuple(y_t.shape)
        assert layer.num_batches_tracked == int(module.num_batches_tracked) == 1
        assert bitwise_equal(layer.running_mean, module.running_mean.numpy())
        assert bitwise_equal(layer.grad_weight, module.weight.grad.numpy())


def test_no_grad_on_an_empty_batch_keeps_nothing():
    layer = cpubn.BatchNorm(C)
    with cpubn.no_grad():
        layer(np.ones((0, C), np.float32))
    with pytest.raises(ValueError, match="no_grad"):
        layer.backward(np.ones((0, C), np.float32))
    before = snapshot(layer)
    with pytest.raises(TypeError):
        layer(np.ones((0, C), np.int32))
    assert_same_state(layer, before)
