"""Edge inference: fold a trained network's BatchNorms away, and what that buys at batch 1.

A small conv net with ``BatchNorm(activation="relu")`` (BN and ReLU fused in one pass) is
trained for a few hundred SGD steps on scikit-learn's 8x8 digits (or on synthetic digits
when scikit-learn is missing), then deployed in eval mode three ways, one image at a time:

1. **BN, then ReLU**: each BatchNorm without activation, then ``np.maximum(y, 0)``;
2. **fused BN+ReLU**: the trained ``BatchNorm(activation="relu")`` layers themselves;
3. **folded**: ``cpubn.fold_into_conv`` / ``cpubn.fold_into_linear`` move each
   BatchNorm into the weights and bias of the layer before it; only the ReLU remains.

The table compares their batch-1 latency (median per image, interleaved rounds) and their
outputs (logits against the unfused network, predictions, test accuracy):

    python -m cpubn.examples.edge_inference

Network: conv3x3(1->8) -> BN+ReLU -> avgpool2 -> conv3x3(8->16) -> BN+ReLU -> avgpool2 ->
flatten -> Linear(64->32) -> BN+ReLU -> Linear(32->10).
"""
import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

import cpubn
from cpubn.examples import nn
from cpubn.examples.data import Digits, load_digits_split, minibatches

BATCH_SIZE = 60
LEARNING_RATE = 0.1
VARIANTS = ("BN, then ReLU", "fused BN+ReLU", "folded")


def load_data(seed=0):
    """(Digits in NCHW, description): scikit-learn's digits, or synthetic ones without it."""
    try:
        return load_digits_split("nchw"), "scikit-learn digits"
    except ImportError:
        pass
    # Ten fixed random 8x8 prototypes plus noise: learnable, and needs no download.
    rng = np.random.default_rng(seed + 1000)
    prototypes = rng.random((10, 1, 8, 8))

    def sample(n):
        labels = rng.integers(0, 10, n)
        images = prototypes[labels] + 0.35 * rng.standard_normal((n, 1, 8, 8))
        return np.clip(images, 0, 1).astype(nn.DTYPE), labels

    x_train, y_train = sample(1200)
    x_test, y_test = sample(400)
    return Digits(x_train, y_train, x_test, y_test), "synthetic digits (scikit-learn not installed)"


def build_network(rng):
    """Layers before a BatchNorm have no bias (the BatchNorm subtracts the mean anyway);
    folding gives them one."""
    return [nn.Conv2d(1, 8, 3, rng, padding=1, bias=False), cpubn.BatchNorm(8, activation="relu"),
            nn.AvgPool2d(),
            nn.Conv2d(8, 16, 3, rng, padding=1, bias=False),
            cpubn.BatchNorm(16, activation="relu"),
            nn.AvgPool2d(), nn.Flatten(),
            nn.Linear(64, 32, rng, init_std=0.125, bias=False),
            cpubn.BatchNorm(32, activation="relu"),
            nn.Linear(32, 10, rng, init_std=0.125)]


def train(data, steps, seed=0, learning_rate=LEARNING_RATE):
    """SGD on the fused network: BatchNorm.backward differentiates through its ReLU."""
    init_rng, batch_rng = np.random.default_rng(seed).spawn(2)
    layers = build_network(init_rng)
    batches = minibatches(len(data.x_train), BATCH_SIZE, batch_rng)
    with nn.single_threaded_blas():
        for _ in range(steps):
            batch = next(batches)
            logits = nn.forward(layers, data.x_train[batch])
            _, dlogits = nn.softmax_cross_entropy(logits, data.y_train[batch])
            nn.backward(layers, dlogits)
            nn.sgd_step(layers, learning_rate)
    nn.set_training(layers, False)
    return layers


def relu(x):
    return np.maximum(x, 0)


def unfused(layers):
    """Each BatchNorm(activation="relu") as a BatchNorm without activation, then a ReLU."""
    out = []
    for layer in layers:
        if isinstance(layer, cpubn.BatchNorm):
            plain = cpubn.BatchNorm(layer.num_features, eps=layer.eps, axis=layer.axis,
                                    dtype=layer.dtype).eval()
            plain.load_state_dict(layer.state_dict())
            out += [plain, relu]
        else:
            out.append(layer)
    return out


def folded(layers):
    """Each BatchNorm folded into the convolution or linear layer before it; the ReLU stays.
    The trained layers are not modified: the folded ones are copies with new arrays."""
    out = []
    for layer in layers:
        if isinstance(layer, cpubn.BatchNorm):
            previous = out.pop()
            merged = copy.copy(previous)
            if isinstance(previous, nn.Conv2d):
                merged.weight, merged.bias = cpubn.fold_into_conv(previous.weight,
                                                                  previous.bias, layer)
            else:   # nn.Linear computes x @ weight: weight is (in_features, out_features)
                merged.weight, merged.bias = cpubn.fold_into_linear(
                    previous.weight, previous.bias, layer, weight_layout="in_out")
            out.append(merged)
            if layer.activation == "relu":
                out.append(relu)
        else:
            out.append(layer)
    return out


def predict_one_at_a_time(layers, images):
    """Logits of each image run alone (batch of 1), as an edge device sees them."""
    return np.concatenate([nn.forward(layers, images[i:i + 1]) for i in range(len(images))])


def is_normalization(layer):
    """The layers folding removes or fuses: BatchNorms and the ReLUs after them."""
    return isinstance(layer, cpubn.BatchNorm) or layer is relu


def batch1_latency_us(networks, images, rounds):
    """{name: (whole network, its BatchNorm and ReLU layers)}: median microseconds per
    batch-1 inference over `rounds` rounds that each run every network on all `images`
    (the starting network rotating).  Every layer call is timed on its own."""
    names = list(networks)
    samples = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            layers = [(layer, is_normalization(layer)) for layer in networks[name]]
            total = normalization = 0.0
            for i in range(len(images)):
                x = images[i:i + 1]
                for layer, counted in layers:
                    start = clock()
                    x = layer(x)
                    spent = clock() - start
                    total += spent
                    if counted:
                        normalization += spent
            samples[name].append((total / len(images) * 1e6, normalization / len(images) * 1e6))
    return {name: tuple(statistics.median(column) for column in zip(*s))
            for name, s in samples.items()}


@dataclass
class Row:
    variant: str
    latency_us: float               # the whole network, per image
    normalization_us: float         # of which in BatchNorm and ReLU layers
    batchnorm_layers: int
    max_logit_difference: float     # against "BN, then ReLU"
    same_predictions: float         # fraction of test images
    test_accuracy: float


def compare(steps=300, seed=0, images=300, rounds=5, data=None):
    """Train, deploy three ways, measure: (rows in VARIANTS order, data description)."""
    data, source = (data, "given data") if data is not None else load_data(seed)
    layers = train(data, steps, seed)
    networks = dict(zip(VARIANTS, (unfused(layers), layers, folded(layers))))
    x_test = data.x_test
    with nn.single_threaded_blas(), cpubn.threads(1):
        logits = {name: predict_one_at_a_time(net, x_test) for name, net in networks.items()}
        latency = batch1_latency_us(networks, x_test[:images], rounds)
    reference = logits[VARIANTS[0]]
    rows = []
    for name, net in networks.items():
        rows.append(Row(
            name, *latency[name], sum(isinstance(layer, cpubn.BatchNorm) for layer in net),
            float(np.abs(logits[name] - reference).max()),
            float(np.mean(logits[name].argmax(1) == reference.argmax(1))),
            float(np.mean(logits[name].argmax(1) == data.y_test))))
    return rows, source


def format_table(rows):
    base = rows[0].latency_us
    lines = [f"{'variant':<15} {'BN layers':>9} {'us/image':>9} {'BN+ReLU us':>10} "
             f"{'speedup':>8} {'max |logit diff|':>16} {'same pred.':>10} {'test acc.':>9}"]
    for row in rows:
        lines.append(f"{row.variant:<15} {row.batchnorm_layers:>9} {row.latency_us:>9.1f} "
                     f"{row.normalization_us:>10.1f} {base / row.latency_us:>7.2f}x "
                     f"{row.max_logit_difference:>16.1e} {row.same_predictions:>10.1%} "
                     f"{row.test_accuracy:>9.3f}")
    return "\n".join(lines)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m cpubn.examples.edge_inference",
        description="Fold a trained conv net's BatchNorms into its layers and compare batch-1 "
                    "inference: BN then ReLU, fused BN+ReLU, folded.")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
    parser.add_argument("--images", type=int, default=300,
                        help="test images per latency round (default 300)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved latency rounds (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="weights, batches (default 0)")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if min(args.steps, args.images, args.rounds) < 1:
        print("error: --steps, --images and --rounds must be positive", file=sys.stderr)
        return 2
    rows, source = compare(args.steps, args.seed, args.images, args.rounds)
    print(f"Conv net trained {args.steps} SGD steps on {source} with fused "
          f"BatchNorm(activation='relu'), then eval-mode inference one image at a time "
          f"(1 thread, median of {args.rounds} rounds of {args.images} images):\n")
    print(format_table(rows))
    print("\nus/image: the whole network; BN+ReLU us: of which in BatchNorm and ReLU layers "
          "(the rest is\nthe im2col convolutions and matrix products). max |logit diff| and "
          "same pred.: against\n'BN, then ReLU' on every test image. Fused is the same "
          "arithmetic in one pass (identical bits);\nfolding rounds the folded weights once "
          "(float32).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
