"""Shortened runs of the cpubn examples, asserting what they are meant to show.

scikit-learn (the digits) comes with the ``test`` extra; these tests do not skip without it.
"""
import re

import numpy as np
import pytest

import cpubn
from cpubn.examples import convnet, nn, paper_mnist
from cpubn.examples.data import load_digits_split

CHANCE = 0.1


@pytest.fixture(scope="module")
def digits_flat():
    return load_digits_split("flat")


@pytest.fixture(scope="module")
def mlp_runs(digits_flat):
    # 1000 steps at the demo's learning rate: the baseline is past its plateau at chance,
    # the BatchNorm network long converged.
    return paper_mnist.compare(digits_flat, steps=1000, eval_every=100)


@pytest.fixture(scope="module")
def conv_runs():
    return convnet.train_both_layouts(steps=240, seed=0)


# ---------------------------------------------------------------------------------------
# Paper experiment (fully-connected sigmoid network)
# ---------------------------------------------------------------------------------------
def test_both_networks_start_from_the_same_weights():
    base = paper_mnist.build_network(False, np.random.default_rng(3))
    bn = paper_mnist.build_network(True, np.random.default_rng(3))
    base_linear = [layer for layer in base if isinstance(layer, nn.Linear)]
    bn_linear = [layer for layer in bn if isinstance(layer, nn.Linear)]
    assert len(base_linear) == len(bn_linear) == 4
    for a, b in zip(base_linear, bn_linear):
        np.testing.assert_array_equal(a.weight, b.weight)
    assert sum(isinstance(layer, cpubn.BatchNorm) for layer in bn) == 3


def test_both_networks_learn(mlp_runs):
    base, bn = mlp_runs["baseline"], mlp_runs["BatchNorm"]
    assert base.steps == bn.steps == list(range(0, 1001, 100))
    assert base.final_accuracy > 5 * CHANCE
    assert bn.final_accuracy > 0.93
    assert base.converged and bn.converged


def test_batchnorm_network_is_ahead_at_the_same_step(mlp_runs):
    base, bn = mlp_runs["baseline"], mlp_runs["BatchNorm"]
    for step, acc_base, acc_bn in zip(base.steps[1:], base.test_accuracy[1:], bn.test_accuracy[1:]):
        assert acc_bn > acc_base, f"step {step}: BatchNorm {acc_bn:.3f} <= baseline {acc_base:.3f}"
    assert bn.final_accuracy > base.final_accuracy + 0.03
    assert bn.steps_to(0.9) < (base.steps_to(0.9) or np.inf)


def test_percentile_traces_are_recorded(mlp_runs):
    for run in mlp_runs.values():
        traces = np.asarray(run.sigmoid_input_percentiles)
        assert traces.shape == (len(run.steps), 3)
        assert np.all(np.isfinite(traces))
        assert np.all(traces[:, 0] <= traces[:, 1]) and np.all(traces[:, 1] <= traces[:, 2])


def test_batchnorm_tolerates_30x_learning_rate(digits_flat):
    results = paper_mnist.learning_rate_sweep(digits_flat, steps=300, multipliers=(30,), eval_every=100)
    runs = {run.name: run for _, run in results}
    assert runs["BatchNorm"].learning_rate == 30 * paper_mnist.LEARNING_RATE
    assert runs["BatchNorm"].converged and runs["BatchNorm"].final_accuracy > 0.9
    assert runs["baseline"].status in ("stuck", "diverged")
    assert runs["baseline"].final_accuracy < 2 * CHANCE


def test_mlp_eval_mode_batch_of_one_matches_batched(digits_flat):
    layers = paper_mnist.build_network(True, np.random.default_rng(0))
    batches = np.random.default_rng(1)
    for _ in range(30):  # a little training so the running statistics are not the initial ones
        batch = batches.choice(len(digits_flat.x_train), paper_mnist.BATCH_SIZE, replace=False)
        logits = nn.forward(layers, digits_flat.x_train[batch])
        _, dlogits = nn.softmax_cross_entropy(logits, digits_flat.y_train[batch])
        nn.backward(layers, dlogits)
        nn.sgd_step(layers, paper_mnist.LEARNING_RATE)
    bns = [layer for layer in layers if isinstance(layer, cpubn.BatchNorm)]
    running = [(bn.running_mean.copy(), bn.running_var.copy(), int(bn.num_batches_tracked)) for bn in bns]

    x = digits_flat.x_test[:50]
    nn.set_training(layers, False)
    batched = nn.forward(layers, x)
    single = np.concatenate([nn.forward(layers, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(single, batched, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(single.argmax(1), batched.argmax(1))
    for bn, (mean, var, count) in zip(bns, running):  # eval mode must not touch the running stats
        np.testing.assert_array_equal(bn.running_mean, mean)
        np.testing.assert_array_equal(bn.running_var, var)
        assert int(bn.num_batches_tracked) == count


def test_paper_demo_command(tmp_path, capsys):
    figure = tmp_path / "figure1.png"
    argv = ["--steps", "60", "--sweep-steps", "20", "--eval-every", "20", "--quiet"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(figure)]
    except ImportError:
        figure = None
    assert paper_mnist.main(argv) == 0
    out = capsys.readouterr().out
    assert "final test accuracy: baseline" in out
    assert "Learning-rate sweep (20 steps each" in out
    sweep_row = r"^ *(baseline|BatchNorm) +[\d.]+ +(1|5|30) +(converged|stuck|diverged) "
    sweep_rows = re.findall(sweep_row, out, re.MULTILINE)
    assert len(sweep_rows) == 6
    if figure is not None:
        assert figure.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------
# Conv net, NCHW and NHWC
# ---------------------------------------------------------------------------------------
def test_conv_net_learns_in_both_layouts(conv_runs):
    for layout, (run, _) in conv_runs.items():
        assert run.final_accuracy > 0.85, layout


def test_conv_net_layouts_agree(conv_runs):
    (first, first_data), (last, last_data) = conv_runs["nchw"], conv_runs["nhwc"]
    np.testing.assert_array_equal(first_data.y_test, last_data.y_test)
    np.testing.assert_array_equal(first_data.x_test, last_data.x_test.transpose(0, 3, 1, 2))
    for bn_first, bn_last in zip(*([layer for layer in run.layers if isinstance(layer, cpubn.BatchNorm)]
                                   for run in (first, last))):
        assert (bn_first.axis, bn_last.axis) == (1, -1)
    # Same weights and batches; the layouts only round float32 sums in different orders, which
    # SGD amplifies over a long run (a ReLU flips): compare outcomes, not bits.
    np.testing.assert_allclose(first.test_accuracy, last.test_accuracy, atol=0.02)
    logits_first = convnet.eval_logits(first.layers, first_data.x_test)
    logits_last = convnet.eval_logits(last.layers, last_data.x_test)
    assert np.mean(logits_first.argmax(1) == logits_last.argmax(1)) >= 0.97


def test_conv_net_layouts_compute_the_same_function(conv_runs):
    (first, first_data), (_, last_data) = conv_runs["nchw"], conv_runs["nhwc"]
    transplanted = convnet.build_network("nhwc", np.random.default_rng(1))
    convnet.copy_weights(first.layers, transplanted)
    np.testing.assert_allclose(convnet.eval_logits(transplanted, last_data.x_test),
                               convnet.eval_logits(first.layers, first_data.x_test), rtol=1e-5, atol=1e-5)


def test_conv_net_layouts_give_the_same_gradients():
    grads = {}
    for layout in convnet.LAYOUTS:
        data = load_digits_split(layout)
        layers = convnet.build_network(layout, np.random.default_rng(0))
        for step in range(3):  # a few SGD steps, then the gradients of one more batch
            batch = slice(60 * step, 60 * step + 60)
            logits = nn.forward(layers, data.x_train[batch])
            _, dlogits = nn.softmax_cross_entropy(logits, data.y_train[batch])
            dx = nn.backward(layers, dlogits)
            if step < 2:
                nn.sgd_step(layers, convnet.LEARNING_RATE)
        grads[layout] = [grad.copy() for layer in layers for _, grad in nn.parameters(layer)]
        grads[layout].append(dx if layout == "nchw" else dx.transpose(0, 3, 1, 2))
    assert len(grads["nchw"]) == 2 * 3 + 2 + 1  # conv, 2 x BN (weight, bias), Linear, dx
    for grad_first, grad_last in zip(grads["nchw"], grads["nhwc"]):
        np.testing.assert_allclose(grad_first, grad_last, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", convnet.LAYOUTS)
def test_conv_net_eval_batch_of_one_matches_batched(conv_runs, layout):
    run, data = conv_runs[layout]
    batched = convnet.eval_logits(run.layers, data.x_test)
    single = convnet.single_sample_inference(run.layers, data.x_test)
    np.testing.assert_allclose(single, batched, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(single.argmax(1), batched.argmax(1))


def test_convnet_command(capsys):
    assert convnet.main(["--steps", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "NCHW vs NHWC" in out and "predictions identical: True" in out


# ---------------------------------------------------------------------------------------
# The example layers themselves
# ---------------------------------------------------------------------------------------
def _naive_conv_nchw(x, weight, padding):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, len(weight), h + 2 * padding - k + 1, w + 2 * padding - k + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = np.einsum("ncij,ocij->no", padded[:, :, i:i + k, j:j + k], weight)
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_forward_and_backward(channels_last):
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(3, 4, 3, rng, padding=1, channels_last=channels_last, bias=False)
    x = rng.standard_normal((2, 3, 5, 6))  # float64 so the identities below hold tightly
    dy = rng.standard_normal((2, 4, 5, 6))
    to_layout = (lambda a: a.transpose(0, 2, 3, 1)) if channels_last else (lambda a: a)
    y = conv(to_layout(x))
    np.testing.assert_allclose(y, to_layout(_naive_conv_nchw(x, conv.weight, 1)), rtol=1e-6, atol=1e-6)
    # The convolution is linear in x and in the weight, so its backward pass is its adjoint:
    # <conv(x), dy> = <x, dx> = <weight, dweight>.
    dx = conv.backward(to_layout(dy))
    assert dx.shape == to_layout(x).shape
    inner = np.sum(y * to_layout(dy))
    np.testing.assert_allclose(np.sum(to_layout(x) * dx), inner, rtol=1e-5)
    np.testing.assert_allclose(np.sum(conv.weight.astype(np.float64) * conv.grad_weight), inner, rtol=1e-5)


def test_pooling_and_flatten_agree_across_layouts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4))
    dy = rng.standard_normal((2, 3, 2, 2))
    flattened = []
    for channels_last in (False, True):
        to_layout = (lambda a: a.transpose(0, 2, 3, 1)) if channels_last else (lambda a: a)
        pool, flat = nn.AvgPool2d(channels_last), nn.Flatten(channels_last)
        y = pool(to_layout(x))
        np.testing.assert_allclose(y, to_layout(x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))))
        np.testing.assert_allclose(np.sum(y * to_layout(dy)),  # backward is the adjoint
                                   np.sum(to_layout(x) * pool.backward(to_layout(dy))))
        flattened.append(flat(y))
        np.testing.assert_array_equal(flat.backward(flattened[-1]), y)
    np.testing.assert_array_equal(flattened[0], flattened[1])  # (C, H, W) order in both layouts


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 10))
    labels = rng.integers(0, 10, 5)
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        shifted = logits.copy()
        shifted[index] += eps
        numeric[index] = (nn.softmax_cross_entropy(shifted, labels)[0] - loss) / eps
    np.testing.assert_allclose(dlogits, numeric, atol=1e-5)
