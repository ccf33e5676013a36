"""A shortened run of the edge-inference example (cpubn/examples/edge_inference.py): the
folded and fused networks give the unfused network's outputs."""
import numpy as np
import pytest

import cpubn
from cpubn.examples import edge_inference, nn


@pytest.fixture(scope="module")
def short_run():
    return edge_inference.compare(steps=40, images=10, rounds=1)


def test_outputs_match_before_and_after_folding(short_run):
    rows, _ = short_run
    by_name = {row.variant: row for row in rows}
    assert [row.variant for row in rows] == list(edge_inference.VARIANTS)
    unfused, fused, folded = (by_name[name] for name in edge_inference.VARIANTS)
    assert unfused.batchnorm_layers == fused.batchnorm_layers == 3
    assert folded.batchnorm_layers == 0
    assert fused.max_logit_difference == 0.0            # same arithmetic, same bits
    assert folded.max_logit_difference < 1e-4           # float32 folded weights
    assert fused.same_predictions == 1.0 and folded.same_predictions >= 0.99
    assert unfused.test_accuracy > 0.5                  # it learned something in 40 steps
    assert all(row.latency_us > row.normalization_us > 0 for row in rows)


def test_folding_leaves_the_trained_network_alone():
    data, _ = edge_inference.load_data()
    layers = edge_inference.train(data, steps=5)
    before = [np.array(p, copy=True) for layer in layers for p, _ in nn.parameters(layer)]
    folded = edge_inference.folded(layers)
    after = [p for layer in layers for p, _ in nn.parameters(layer)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert not any(isinstance(layer, cpubn.BatchNorm) for layer in folded)
    x = data.x_test[:7]
    np.testing.assert_allclose(nn.forward(folded, x), nn.forward(layers, x), rtol=1e-4, atol=1e-5)


def test_synthetic_data_without_scikit_learn(monkeypatch):
    def missing(layout):
        raise ImportError("no scikit-learn")

    monkeypatch.setattr(edge_inference, "load_digits_split", missing)
    data, source = edge_inference.load_data()
    assert "synthetic" in source
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32


def test_main_prints_the_table(capsys):
    assert edge_inference.main(["--steps", "5", "--images", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for name in edge_inference.VARIANTS:
        assert name in out
    assert "us/image" in out
    assert edge_inference.main(["--steps", "0"]) == 2
