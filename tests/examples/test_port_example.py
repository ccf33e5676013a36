"""The PyTorch porting example (cpubn/examples/port_torch.py): every variant matches
PyTorch's eval output, and the check is sharp enough to see an unported BatchNorm."""
import subprocess
import sys

import numpy as np
import pytest

import cpubn
from cpubn.examples import nn, port_torch

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ported():
    return port_torch.compare(steps=20, seed=1, images=128)


def test_every_variant_matches_pytorch_in_both_layouts(ported):
    _, rows = ported
    assert [(r.layout, r.variant) for r in rows] == [
        (layout, variant) for layout in ("nchw", "nhwc") for variant in port_torch.VARIANTS]
    for row in rows:
        assert row.max_logit_diff < port_torch.TOLERANCE, row
        assert row.same_predictions == 1.0, row


def test_running_statistics_are_not_trivial_and_unported_layers_would_show(ported):
    model, _ = ported
    bn = model[0][1]
    assert int(bn.num_batches_tracked) == 20
    assert np.abs(bn.running_mean.numpy()).max() > 0.5
    x, _ = port_torch.synthetic_images(64, np.random.default_rng(5))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    layers = port_torch.port(model, "state dict")
    for index, layer in enumerate(layers):     # BatchNorms left at their initial state
        if isinstance(layer, cpubn.BatchNorm):
            layers[index] = cpubn.BatchNorm(layer.num_features).eval()
    assert np.abs(nn.forward(layers, x) - expected).max() > 100 * port_torch.TOLERANCE


def test_fused_variant_uses_the_modules_hyperparameters(ported):
    model, _ = ported
    fused = [layer for layer in port_torch.port(model, "fused")
             if isinstance(layer, cpubn.BatchNorm)]
    assert len(fused) == 3
    assert all(layer.activation == "relu" and not layer.training for layer in fused)


def test_script_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cpubn.examples.port_torch", "--steps", "5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "folded" in result.stdout and "largest difference" in result.stdout
