"""A small convolutional network with ``cpubn.BatchNorm`` after each convolution.

Trained twice on scikit-learn's 8x8 digits, once channels-first (NCHW, ``BatchNorm(axis=1)``)
and once channels-last (NHWC, ``BatchNorm(axis=-1)``), from the same initial weights and
the same mini-batches: the two layouts compute the same function, so they end with the
same test accuracy and near-identical logits. The trained network is then switched to
eval mode (running statistics) and classifies the test digits one at a time, matching
batched inference:

    python -m cpubn.examples.convnet

Network: conv3x3(1->8) -> BN -> ReLU -> avgpool2 -> conv3x3(8->16) -> BN -> ReLU -> avgpool2
-> flatten -> Linear(64 -> 10), softmax cross-entropy, plain SGD.
"""
import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import cpubn
from cpubn.examples import nn
from cpubn.examples.data import load_digits_split, minibatches
from cpubn.examples.progress import ProgressBar

BATCH_SIZE = 60
LEARNING_RATE = 0.1
LAYOUTS = ("nchw", "nhwc")


def build_network(layout, rng):
    channels_last = layout == "nhwc"
    axis = -1 if channels_last else 1  # where the channels are: BatchNorm's feature axis
    layers = []
    in_channels = 1
    for out_channels in (8, 16):
        # No conv bias: the BatchNorm right after it subtracts the per-channel mean anyway.
        layers += [nn.Conv2d(in_channels, out_channels, 3, rng, padding=1,
                             channels_last=channels_last, bias=False),
                   cpubn.BatchNorm(out_channels, axis=axis),
                   nn.ReLU(),
                   nn.AvgPool2d(channels_last)]
        in_channels = out_channels
    layers += [nn.Flatten(channels_last), nn.Linear(16 * 2 * 2, 10, rng, init_std=0.125)]
    return layers


@dataclass
class ConvRun:
    layout: str
    layers: list
    steps: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self):
        return self.test_accuracy[-1]


def train(layout, data, steps, learning_rate=LEARNING_RATE, seed=0, eval_every=None,
          progress=False):
    """Train the conv net on ``data`` (already in ``layout``); the seed fixes weights and batches."""
    eval_every = eval_every or max(1, steps // 10)
    init_rng, batch_rng = np.random.default_rng(seed).spawn(2)
    run = ConvRun(layout, build_network(layout, init_rng))
    batches = minibatches(len(data.x_train), BATCH_SIZE, batch_rng)
    bar = ProgressBar(steps, f"convnet {layout}", enabled=progress)
    start = time.perf_counter()
    with nn.single_threaded_blas():
        for step in range(1, steps + 1):
            batch = next(batches)
            logits = nn.forward(run.layers, data.x_train[batch])
            _, dlogits = nn.softmax_cross_entropy(logits, data.y_train[batch])
            nn.backward(run.layers, dlogits)
            nn.sgd_step(run.layers, learning_rate)
            if step % eval_every == 0 or step == steps:
                run.steps.append(step)
                accuracy = np.mean(nn.predict(run.layers, data.x_test) == data.y_test)
                run.test_accuracy.append(float(accuracy))
            bar.update()
    run.seconds = time.perf_counter() - start
    bar.close(note=f"test acc {run.final_accuracy:.3f}")
    return run


def eval_logits(layers, x):
    """Logits from one batched forward pass in eval mode (running statistics)."""
    with nn.eval_mode(layers):
        return nn.forward(layers, x)


def train_both_layouts(steps, learning_rate=LEARNING_RATE, seed=0, progress=False):
    """{"nchw": (run, data), "nhwc": (run, data)}, same seed for both."""
    results = {}
    for layout in LAYOUTS:
        data = load_digits_split(layout)
        results[layout] = (train(layout, data, steps, learning_rate, seed, progress=progress), data)
    return results


def copy_weights(source, target):
    """Load one network's trained weights into another of the same architecture.

    The layouts share every parameter shape, so a network trained channels-first can be
    deployed channels-last. BatchNorm state moves with ``state_dict`` / ``load_state_dict``.
    """
    for src, dst in zip(source, target, strict=True):
        if isinstance(src, cpubn.BatchNorm):
            dst.load_state_dict(src.state_dict())
        else:
            for (param, _), (param_dst, _) in zip(nn.parameters(src), nn.parameters(dst), strict=True):
                param_dst[...] = param


def single_sample_inference(layers, x):
    """Eval-mode logits computed one sample at a time (batch of 1)."""
    with nn.eval_mode(layers):
        return np.concatenate([nn.forward(layers, x[i:i + 1]) for i in range(len(x))])


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m cpubn.examples.convnet",
        description="A small BatchNorm conv net on the 8x8 digits, channels-first and channels-last.")
    parser.add_argument("--steps", type=int, default=600, help="SGD steps per layout (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                        help=f"learning rate (default {LEARNING_RATE})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be positive", file=sys.stderr)
        return 2
    try:
        results = train_both_layouts(args.steps, args.lr, args.seed, progress=not args.quiet)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (first, first_data), (last, last_data) = results["nchw"], results["nhwc"]

    print(f"\nConv net, {args.steps} SGD steps (batch {BATCH_SIZE}, lr {args.lr:g}, seed {args.seed}): "
          f"test accuracy on {len(first_data.x_test)} digits")
    print(f"{'step':>6}  {'NCHW axis=1':>11}  {'NHWC axis=-1':>12}")
    for step, acc_first, acc_last in zip(first.steps, first.test_accuracy, last.test_accuracy):
        print(f"{step:>6}  {acc_first:>11.3f}  {acc_last:>12.3f}")
    print(f"training time: NCHW {first.seconds:.1f}s, NHWC {last.seconds:.1f}s")

    logits_first = eval_logits(first.layers, first_data.x_test)
    logits_last = eval_logits(last.layers, last_data.x_test)
    same_predictions = np.mean(logits_first.argmax(1) == logits_last.argmax(1))
    print(f"\nNCHW vs NHWC, each trained in its own layout: same prediction on {same_predictions:.1%} "
          f"of the test digits, max |logit difference| {np.abs(logits_first - logits_last).max():.1e}")
    print("  (the layouts round float32 sums in different orders; once a ReLU input lands within that\n"
          "   rounding of 0, its gradient flows in one layout only and SGD carries the difference on)")
    transplanted = build_network("nhwc", np.random.default_rng(0))
    copy_weights(first.layers, transplanted)
    logits_transplanted = eval_logits(transplanted, last_data.x_test)
    print(f"NCHW-trained weights run channels-last: max |logit difference| "
          f"{np.abs(logits_transplanted - logits_first).max():.1e}")


    # Deployment: eval mode normalizes with the running statistics, so one digit at a time works.
    single = single_sample_inference(first.layers, first_data.x_test)
    print(f"\neval mode, NCHW: batch-1 inference vs one batch of {len(single)}: max |logit difference| "
          f"{np.abs(single - logits_first).max():.2e}, predictions identical: "
          f"{bool(np.array_equal(single.argmax(1), logits_first.argmax(1)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
