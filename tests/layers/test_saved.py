"""What a layer keeps between calls: its state, never its last input beyond need.

Pickling (and copying) a layer works after any sequence of calls and keeps its state but
neither its per-call caches nor what its last forward saved for backward; eval-mode
forwards keep only weak references to their input and output, forwards under
cpubn.no_grad() keep nothing, and clear_saved() drops what a training forward kept.
"""
import copy
import gc
import pickle
import threading
import weakref

import numpy as np
import pytest

import cpubn
from bn_testing import bitwise_equal, make_x

LAYERS = {
    "BatchNorm": lambda: cpubn.BatchNorm(8),
    "BatchRenorm": lambda: cpubn.BatchRenorm(8, rmax=1.5, dmax=0.5),
    "GhostBatchNorm": lambda: cpubn.GhostBatchNorm(8, 4),
    "LazyBatchNorm": lambda: cpubn.LazyBatchNorm(),
    "BatchNorm-relu-nhwc": lambda: cpubn.BatchNorm(8, axis=-1, activation="relu"),
}


def _input(layer, rng, n=16):
    shape = (n, 6, 6, 8) if layer.axis == -1 else (n, 8, 6, 6)
    return make_x(rng, shape, np.float32, layer.axis)


def _calls(layer, rng):
    """Training and eval calls, with and without out=, and backward."""
    x = _input(layer, rng)
    out = np.empty_like(x)
    layer(x, out=out)
    layer.backward(np.ones_like(x))
    layer.eval()
    layer(x, out=out)
    layer.backward(np.ones_like(x))
    layer.train()
    y = layer(x)
    return x, y


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("clone", ["pickle", "deepcopy"])
def test_a_used_layer_pickles_and_computes_the_same_bits(kind, clone, rng):
    layer = LAYERS[kind]()
    x, _ = _calls(layer, rng)
    if clone == "pickle":
        data = pickle.dumps(layer)
        # The state only: per-channel arrays, not the last input (x is 18 KiB here).
        assert len(data) < 4096, len(data)
        twin = pickle.loads(data)
    else:
        twin = copy.deepcopy(layer)
    assert type(twin) is type(layer)
    with pytest.raises(ValueError, match="before any forward"):
        twin.backward(np.ones_like(x))
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        twin.train(mode == "train")
        x = _input(layer, rng)
        out = np.empty_like(x)
        y_twin, y = twin(x, out=out), layer(x)      # held: eval backward reads the ReLU mask
        assert bitwise_equal(y_twin, y)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        assert bitwise_equal(twin.backward(dy), layer.backward(dy))
        for name, value in layer.state_dict().items():
            assert bitwise_equal(twin.state_dict()[name], value), name
        assert bitwise_equal(twin.grad_weight, layer.grad_weight)


def test_an_unused_lazy_layer_pickles():
    twin = pickle.loads(pickle.dumps(cpubn.LazyBatchNorm(eps=1e-3)))
    assert twin.num_features is None and twin.eps == 1e-3
    assert twin(np.ones((4, 3), np.float32)).shape == (4, 3)


def test_pickling_inside_precise_statistics_leaves_the_hook_behind(rng):
    layer = cpubn.BatchNorm(8)
    with cpubn.precise_statistics([layer]):
        layer(_input(layer, rng))
        twin = pickle.loads(pickle.dumps(layer))
    assert "_track_batch" not in vars(twin)
    before = twin.num_batches_tracked
    twin(_input(layer, rng))
    assert twin.num_batches_tracked == before + 1


def test_sync_batchnorm_refuses_to_pickle_with_a_reason():
    pytest.importorskip("mpi4py")
    layer = cpubn.SyncBatchNorm(4)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(layer)


# ---------------------------------------------------------------- what stays alive
def _alive_after(make_input, run):
    """Whether the input made by make_input() is still alive after run(input) returns and
    the caller drops it."""
    x = make_input()
    ref = weakref.ref(x)
    result = run(x)
    del x
    gc.collect()
    return ref() is not None, result


def test_an_eval_chain_keeps_only_its_final_output(rng):
    layers = [cpubn.BatchNorm(8).eval() for _ in range(12)]
    refs = []

    def chain(x):
        for layer in layers:
            x = layer(x)
            refs.append(weakref.ref(x))
        return x

    alive, final = _alive_after(lambda: _input(layers[0], rng), chain)
    gc.collect()
    assert not alive
    assert [r() is not None for r in refs] == [False] * 11 + [True]
    assert refs[-1]() is final


def test_eval_backward_works_while_the_caller_holds_the_input(rng):
    layer = cpubn.BatchNorm(8, activation="relu").eval()
    reference = cpubn.BatchNorm(8, activation="relu").eval()
    x = _input(layer, rng)
    y = layer(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    # The same as a layer whose input and output are held by the test's own names.
    y_ref = reference(x)
    assert bitwise_equal(layer.backward(dy), reference.backward(dy))
    del y, y_ref
    gc.collect()
    with pytest.raises(ValueError, match="weak references"):
        layer.backward(dy)


def test_eval_backward_after_the_input_is_gone_raises(rng):
    layer = cpubn.BatchNorm(8).eval()
    layer(_input(layer, rng))
    gc.collect()
    with pytest.raises(ValueError, match="no longer exist"):
        layer.backward(np.ones((16, 8, 6, 6), np.float32))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_keeps_nothing_and_still_tracks(training, rng):
    layer = cpubn.BatchNorm(8).train(training)
    with cpubn.no_grad():
        alive, _ = _alive_after(lambda: _input(layer, rng), layer)
    assert not alive
    assert layer.num_batches_tracked == (1 if training else 0)
    with pytest.raises(ValueError, match="no_grad"):
        layer.backward(np.ones((16, 8, 6, 6), np.float32))
    # Outside the block the layer saves again.
    x = _input(layer, rng)
    layer(x)
    assert layer.backward(np.ones_like(x)).shape == x.shape


def test_no_grad_is_per_python_thread_and_nests(rng):
    layer = cpubn.BatchNorm(8)
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        if not inside.wait(timeout=30):
            return
        x = _input(layer, rng)
        twin = cpubn.BatchNorm(8)
        twin(x)
        seen["saved"] = twin.backward(np.ones_like(x)) is not None
        outside.set()

    worker = threading.Thread(target=other_thread, daemon=True)
    worker.start()
    try:
        with cpubn.no_grad():
            with cpubn.no_grad():
                pass
            inside.set()
            assert outside.wait(timeout=30)
            alive, _ = _alive_after(lambda: _input(layer, rng), layer)   # still inside
    finally:
        inside.set()
        worker.join(timeout=30)
    assert seen == {"saved": True} and not alive


def test_clear_saved_drops_the_training_input(rng):
    layer = cpubn.BatchNorm(8)

    def forward_then_clear(x):
        layer(x)
        layer.clear_saved()

    alive, _ = _alive_after(lambda: _input(layer, rng), forward_then_clear)
    assert not alive
    with pytest.raises(ValueError, match="clear_saved"):
        layer.backward(np.ones((16, 8, 6, 6), np.float32))


def test_a_training_forward_keeps_its_input_for_backward(rng):
    layer = cpubn.BatchNorm(8)
    alive, _ = _alive_after(lambda: _input(layer, rng), layer)
    assert alive
    assert layer.backward(np.ones((16, 8, 6, 6), np.float32)).shape == (16, 8, 6, 6)
