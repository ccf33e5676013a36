"""precise_statistics: exact population statistics, modes, counters, the exception path
and bad arguments, for every cpubn normalization layer."""
import numpy as np
import pytest

import cpubn
from bn_testing import assert_close, assert_same_state, bitwise_equal, make_x, shape_for, snapshot
from reference import to_rows

LAYER_KINDS = ["BatchNorm", "BatchRenorm", "GhostBatchNorm", "LazyBatchNorm"]


def make_layer(kind, C, axis, dtype):
    if kind == "BatchNorm":
        return cpubn.BatchNorm(C, axis=axis, dtype=dtype)
    if kind == "BatchRenorm":
        return cpubn.BatchRenorm(C, axis=axis, dtype=dtype)
    if kind == "GhostBatchNorm":
        return cpubn.GhostBatchNorm(C, 3, axis=axis, dtype=dtype)
    return cpubn.LazyBatchNorm(axis=axis, dtype=dtype)


def population(batches, axis):
    """The oracle: mean and unbiased variance of all batches as one, in float64."""
    rows = np.concatenate([to_rows(x, axis) for x in batches])
    return rows.mean(axis=0), rows.var(axis=0, ddof=1)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ndim,axis", [(2, 1), (4, 1), (4, -1)])
def test_statistics_are_exact_over_any_batch_sizes(kind, dtype, ndim, axis, rng):
    C = 5
    layer = make_layer(kind, C, axis, dtype)
    layer(make_x(rng, shape_for(ndim, axis, C), dtype, axis))   # some history first
    layer.eval()
    count_before = layer.num_batches_tracked
    # Batch sizes 8, 2, 12, 5 with per-batch offsets: a trailing average, or an average of
    # the batches' own statistics, would be far from the population's.
    batches = [make_x(rng, shape_for(ndim, axis, C, sizes=(n, 3, 2, 2)), dtype, axis,
                      loc=4.0) + offset for n, offset in ((8, 0), (2, 3), (12, -5), (5, 1))]
    outputs = []
    with cpubn.precise_statistics([layer]):
        assert layer.training
        for x in batches:
            outputs.append(layer(x))
    assert not layer.training
    assert layer.num_batches_tracked == count_before + len(batches)
    mean, var = population(batches, axis)
    assert_close(layer.running_mean, mean, dtype, "stat", "running_mean")
    assert_close(layer.running_var, var, dtype, "stat", "running_var")


def test_forwards_inside_normalize_with_batch_statistics(rng):
    layer, twin = cpubn.BatchNorm(3, dtype=np.float64), cpubn.BatchNorm(3, dtype=np.float64)
    x = make_x(rng, (6, 3, 4), np.float64, 1)
    with cpubn.precise_statistics([layer]):
        y = layer(x)
        dx = layer.backward(np.ones_like(x))
    assert bitwise_equal(y, twin(x))
    assert bitwise_equal(dx, twin.backward(np.ones_like(x)))


def test_ghost_and_renorm_layers_get_whole_batch_statistics(rng):
    # Neither the ghost chunks nor renorm's r, d change what the statistics are.
    layers = [cpubn.GhostBatchNorm(4, 2, dtype=np.float64),
              cpubn.BatchRenorm(4, dtype=np.float64, rmax=1.1, dmax=0.1)]
    batches = [make_x(rng, (n, 4, 3), np.float64, 1) for n in (5, 8)]
    with cpubn.precise_statistics(layers):
        for x in batches:
            for layer in layers:
                layer(x)
    mean, var = population(batches, 1)
    for layer in layers:
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var, var, rtol=1e-12, atol=1e-14)
        assert layer.num_batches_tracked == 2


def test_a_model_of_several_layers(rng):
    """The use case: a model exposes its layers; the block runs it on a few batches."""
    bn1, bn2 = cpubn.BatchNorm(4), cpubn.BatchNorm(4, axis=-1)
    model = [bn1, bn2]
    batches = [make_x(rng, (10, 4), np.float32, 1) for _ in range(3)]
    hidden = []
    with cpubn.precise_statistics(layer for layer in model):      # any iterable
        for x in batches:
            h = bn1(x)
            hidden.append(h)
            bn2(h * 2 + 1)
    mean, var = population(batches, 1)
    assert_close(bn1.running_mean, mean, np.float32, "stat")
    mean2, var2 = population([h * 2 + 1 for h in hidden], -1)
    assert_close(bn2.running_var, var2, np.float32, "stat")


def test_modes_are_restored_and_hooks_removed(rng):
    training, evaluating = cpubn.BatchNorm(2), cpubn.BatchNorm(2).eval()
    with cpubn.precise_statistics([training, evaluating, training]):   # duplicates: once
        assert training.training and evaluating.training
        training(make_x(rng, (4, 2), np.float32, 1))
    assert training.training and not evaluating.training
    assert training.num_batches_tracked == 1
    assert "_track_batch" not in vars(training)
    # Running averages work as before afterwards:
    before = training.running_mean.copy()
    x = make_x(rng, (4, 2), np.float32, 1)
    training(x)
    assert_close(training.running_mean, 0.9 * before + 0.1 * x.astype(np.float64).mean(0),
                 np.float32, "stat")
    assert training.num_batches_tracked == 2


def test_a_layer_that_saw_nothing_keeps_its_statistics(rng):
    used, unused = cpubn.BatchNorm(2), cpubn.BatchNorm(2)
    unused.running_mean[...] = [1, 2]
    before = snapshot(unused)
    with cpubn.precise_statistics([used, unused]):
        used(make_x(rng, (4, 2), np.float32, 1))
        unused.eval()                              # a mode change inside is undone too
    assert_same_state(unused, before)


def test_exception_leaves_everything_as_it_was(rng):
    layers = [cpubn.BatchNorm(3), cpubn.GhostBatchNorm(3, 2).eval(), cpubn.BatchRenorm(3)]
    for layer in layers:
        layer.train()(make_x(rng, (4, 3), np.float32, 1))
    layers[1].eval()
    before = [snapshot(layer) for layer in layers]
    with pytest.raises(KeyError):
        with cpubn.precise_statistics(layers):
            for layer in layers:
                layer(make_x(rng, (6, 3), np.float32, 1))
            raise KeyError("interrupted")
    for layer, snap in zip(layers, before):
        assert_same_state(layer, snap)
        assert "_track_batch" not in vars(layer)
    # A failing forward inside the block (bad input) is the same:
    with pytest.raises(ValueError):
        with cpubn.precise_statistics(layers):
            layers[0](make_x(rng, (6, 3), np.float32, 1))
            layers[0](make_x(rng, (6, 5), np.float32, 1))
    for layer, snap in zip(layers, before):
        assert_same_state(layer, snap)


def test_bad_arguments(rng):
    with pytest.raises(TypeError, match="normalization layers"):
        with cpubn.precise_statistics([cpubn.BatchNorm(2), object()]):
            pass
    with pytest.raises(TypeError):
        with cpubn.precise_statistics(cpubn.BatchNorm(2)):     # not an iterable of layers
            pass
    no_stats = cpubn.BatchNorm(2, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats"):
        with cpubn.precise_statistics([no_stats]):
            pass
    layer = cpubn.BatchNorm(2)
    with cpubn.precise_statistics([layer]):
        with pytest.raises(ValueError, match="already"):
            with cpubn.precise_statistics([layer]):
                pass
        layer(make_x(rng, (3, 2), np.float32, 1))
    assert layer.num_batches_tracked == 1
    # A refused call hooked nothing:
    good = cpubn.BatchNorm(2)
    with pytest.raises(ValueError):
        with cpubn.precise_statistics([good, no_stats]):
            pass
    assert "_track_batch" not in vars(good) and good.training


# ---------------------------------------------------------------- SyncBatchNorm
def _sync_module():
    if not hasattr(cpubn, "SyncBatchNorm"):
        pytest.skip("no SyncBatchNorm in this build")
    pytest.importorskip("mpi4py")
    import cpubn._layers.sync as sync_module
    return sync_module


def test_sync_batchnorm_one_process(rng):
    _sync_module()
    sync, bn = cpubn.SyncBatchNorm(3, dtype=np.float64), cpubn.BatchNorm(3, dtype=np.float64)
    batches = [make_x(rng, (n, 3, 2), np.float64, 1) for n in (4, 7)]
    for layer in (sync, bn):
        with cpubn.precise_statistics([layer]):
            for x in batches:
                layer(x)
    assert bitwise_equal(sync.running_mean, bn.running_mean)
    assert bitwise_equal(sync.running_var, bn.running_var)
    assert sync.num_batches_tracked == 2


def test_sync_batchnorm_uses_the_global_batch(rng, monkeypatch):
    """A second process is simulated at the MPI boundary: its rows (count, mean, biased
    variance of its own batches) join ours in the all-gather.  The population is then
    everything both processes saw, weighted by the global counts."""
    sync_module = _sync_module()
    for name in ("allgather_rows", "_HEADER", "_COUNT", "_PHASE", "_FORWARD"):
        if not hasattr(sync_module, name):
            pytest.skip(f"cpubn._layers.sync has no {name}: update this test's simulated process")
    C, H = 3, sync_module._HEADER
    others = iter([make_x(rng, (n, C), np.float64, 1, loc=6.0) for n in (9, 2)])
    theirs = []

    def allgather_with_a_second_process(comm, row):
        other = row.copy()
        if row[sync_module._PHASE] == sync_module._FORWARD:
            x = next(others)
            theirs.append(x)
            other[sync_module._COUNT] = len(x)
            other[H:H + C] = x.mean(axis=0)
            other[H + C:] = x.var(axis=0)
        return np.stack([row, other])

    monkeypatch.setattr(sync_module, "allgather_rows", allgather_with_a_second_process)
    sync = cpubn.SyncBatchNorm(C, dtype=np.float64)
    ours = [make_x(rng, (n, C), np.float64, 1) for n in (3, 6)]
    with cpubn.precise_statistics([sync]):
        for x in ours:
            sync(x)
    mean, var = population(ours + theirs, 1)
    np.testing.assert_allclose(sync.running_mean, mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sync.running_var, var, rtol=1e-12, atol=1e-13)
