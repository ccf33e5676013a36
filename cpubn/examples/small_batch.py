"""BatchNorm's small-batch remedies on scikit-learn's 8x8 digits.

Batch Normalization trains on batch statistics and infers with running averages; when
mini-batches are small or not i.i.d., the two disagree.  This demo trains the paper
example's MLP (64 -> 3 x (Linear -> norm -> Sigmoid) -> Linear -> 10) with

* ``BatchNorm``,
* ``BatchRenorm`` (Ioffe 2017; rmax/dmax ramped with ``cpubn.renorm_schedule``),
* ``GhostBatchNorm`` (Hoffer et al. 2017; ghost batches of a quarter of the batch, at
  least 2 samples: 15 for batches of 60, 2 for batches of 4 and 8, and BatchNorm itself
  for batches of 2; a remedy for large batches, shown here where it does not help too),
* ``BatchNorm + precise``: the BatchNorm network, its running statistics then replaced
  by exact population statistics (``cpubn.precise_statistics``, Wu & Johnson 2021) over
  one pass of the training data in batches drawn as in training,

on batches of 2, 4 and 8 i.i.d. samples, on non-i.i.d. batches of 60 drawn from only two
classes (as in the Batch Renormalization paper, section 4.3), and on i.i.d. batches of 60
(the reference).  Every run sees the same number of samples; each cell is the mean and
spread (min..max) over several seeds.  Reported: test accuracy in eval mode (running
statistics), and the train/eval gap: test accuracy computed in training mode (batch
statistics, on test batches drawn like the training batches) minus the eval accuracy.

    python -m cpubn.examples.small_batch [--seeds 3] [--plot FILE.png] [--quick]
"""
import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

import cpubn
from cpubn.examples import nn
from cpubn.examples.data import load_digits_split

HIDDEN_LAYERS = 3
HIDDEN_UNITS = 100
INIT_STD = 0.1
REFERENCE_BATCH = 60
REFERENCE_LR = 0.5
SAMPLES_PER_RUN = 60_000            # about 45 epochs of the 1,347 training digits
METHODS = ("BatchNorm", "BatchRenorm", "GhostBatchNorm", "BatchNorm + precise")
# (label, batch size, i.i.d.?)
SETTINGS = (("batch 2", 2, True), ("batch 4", 4, True), ("batch 8", 8, True),
            ("non-iid 60", 60, False), ("iid 60", 60, True))


def learning_rate(batch_size):
    """The paper example's 0.5 at batch 60, scaled by sqrt(batch / 60) for smaller batches
    (the gradient noise of a mean over fewer samples)."""
    return REFERENCE_LR * math.sqrt(batch_size / REFERENCE_BATCH)


def ghost_batch_size(batch_size):
    return max(2, batch_size // 4)


def build_network(method, batch_size, rng):
    """64 -> 3 x (Linear -> normalization -> Sigmoid) -> Linear -> 10, float32."""
    layers, fan_in = [], 64
    for _ in range(HIDDEN_LAYERS):
        layers.append(nn.Linear(fan_in, HIDDEN_UNITS, rng, INIT_STD, bias=False))
        if method == "BatchRenorm":
            norm = cpubn.BatchRenorm(HIDDEN_UNITS, rmax=1.0, dmax=0.0)
        elif method == "GhostBatchNorm":
            norm = cpubn.GhostBatchNorm(HIDDEN_UNITS, ghost_batch_size(batch_size))
        else:
            norm = cpubn.BatchNorm(HIDDEN_UNITS)
        layers += [norm, nn.Sigmoid()]
        fan_in = HIDDEN_UNITS
    layers.append(nn.Linear(fan_in, 10, rng, INIT_STD))
    return layers


def norm_layers(layers):
    """The model's normalization layers: all precise_statistics needs to know of it."""
    return [layer for layer in layers if isinstance(layer, cpubn.BatchNorm)]


def batches(labels, batch_size, iid, rng):
    """Endless index batches: i.i.d. (shuffled epochs, last partial batch dropped), or
    non-i.i.d.: two random classes, batch_size // 2 samples of each, shuffled together."""
    if iid:
        while True:
            order = rng.permutation(len(labels))
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield order[start:start + batch_size]
    by_class = [np.flatnonzero(labels == k) for k in range(10)]
    while True:
        first, second = rng.choice(10, size=2, replace=False)
        half = batch_size // 2
        batch = np.concatenate([rng.choice(by_class[first], half, replace=False),
                                rng.choice(by_class[second], batch_size - half, replace=False)])
        yield rng.permutation(batch)


@dataclass
class Result:
    method: str
    setting: str
    seed: int
    eval_accuracy: float
    train_mode_accuracy: float
    seconds: float

    @property
    def gap(self):
        return self.train_mode_accuracy - self.eval_accuracy


def train(method, batch_size, iid, data, seed, samples):
    """One network trained with plain SGD; returns its layers."""
    init_rng, batch_rng = np.random.default_rng([seed, batch_size, iid]).spawn(2)
    layers = build_network(method, batch_size, init_rng)
    steps = max(1, samples // batch_size)
    lr = learning_rate(batch_size)
    stream = batches(data.y_train, batch_size, iid, batch_rng)
    renorm = norm_layers(layers) if method == "BatchRenorm" else []
    # The paper's schedule (plain BatchNorm for 5k of its steps, dmax at 25k, rmax at 40k
    # of about 130k), scaled to this run.
    schedule = dict(warmup_steps=steps // 20, dmax_steps=steps // 5,
                    rmax_steps=(3 * steps) // 10)
    for step in range(steps):
        if renorm:
            limits = cpubn.renorm_schedule(step, **schedule)
            for layer in renorm:
                layer.rmax, layer.dmax = limits
        batch = next(stream)
        logits = nn.forward(layers, data.x_train[batch])
        _, dlogits = nn.softmax_cross_entropy(logits, data.y_train[batch])
        nn.backward(layers, dlogits)
        nn.sgd_step(layers, lr)
    return layers


def recompute_precise(layers, batch_size, iid, data, seed):
    """Replace the running statistics by exact ones over one epoch of training batches
    drawn as in training (final weights, no backward)."""
    stream = batches(data.y_train, batch_size, iid, np.random.default_rng([seed, 7]))
    with cpubn.precise_statistics(norm_layers(layers)):
        for _ in range(max(1, len(data.x_train) // batch_size)):
            nn.forward(layers, data.x_train[next(stream)])


def eval_accuracy(layers, data):
    return float(np.mean(nn.predict(layers, data.x_test) == data.y_test))


def train_mode_accuracy(layers, batch_size, iid, data, seed, rounds=3):
    """Test accuracy with batch statistics, the test set cut into batches drawn as in
    training (i.i.d.: a few shuffles covering every test digit; non-i.i.d.: as many
    two-class batches), on a copy so the running statistics stay untouched."""
    layers = copy.deepcopy(layers)
    rng = np.random.default_rng([seed, 11])
    stream = batches(data.y_test, batch_size, iid, rng)
    correct = total = 0
    for _ in range(rounds * (len(data.x_test) // batch_size)):
        batch = next(stream)
        correct += int(np.sum(nn.forward(layers, data.x_test[batch]).argmax(axis=1)
                              == data.y_test[batch]))
        total += len(batch)
    return correct / total


def run_setting(label, batch_size, iid, data, seeds, samples, progress=None):
    """Every method in one setting, for each seed: a list of Results."""
    results = []
    for seed in seeds:
        for method in ("BatchNorm", "BatchRenorm", "GhostBatchNorm"):
            start = time.perf_counter()
            layers = train(method, batch_size, iid, data, seed, samples)
            variants = [(method, layers)]
            if method == "BatchNorm":
                precise = copy.deepcopy(layers)
                recompute_precise(precise, batch_size, iid, data, seed)
                variants.append(("BatchNorm + precise", precise))
            seconds = time.perf_counter() - start
            for name, trained in variants:
                results.append(Result(name, label, seed, eval_accuracy(trained, data),
                                      train_mode_accuracy(trained, batch_size, iid, data,
                                                          seed), seconds))
            if progress:
                progress(f"{label:>11}  seed {seed}  {method:<15} {seconds:5.1f}s")
    return results


def run_all(data, seeds=(0, 1, 2), samples=SAMPLES_PER_RUN, settings=SETTINGS,
            progress=None):
    with nn.single_threaded_blas():
        return [r for label, size, iid in settings
                for r in run_setting(label, size, iid, data, seeds, samples, progress)]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def summarize(results):
    """{(setting, method): (mean eval acc, min, max, mean gap, min gap, max gap)}."""
    cells = {}
    for r in results:
        cells.setdefault((r.setting, r.method), []).append(r)
    summary = {}
    for key, rs in cells.items():
        acc = np.array([r.eval_accuracy for r in rs])
        gap = np.array([r.gap for r in rs])
        summary[key] = (acc.mean(), acc.min(), acc.max(), gap.mean(), gap.min(), gap.max())
    return summary


def format_table(results):
    summary = summarize(results)
    settings = list(dict.fromkeys(r.setting for r in results))
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    n_seeds = len({r.seed for r in results})
    lines = [f"Test accuracy in eval mode, mean (min..max) over {n_seeds} seeds",
             f"{'':>11}  " + "  ".join(f"{m:>21}" for m in methods)]
    for s in settings:
        cells = [f"{summary[s, m][0]:.3f} ({summary[s, m][1]:.3f}..{summary[s, m][2]:.3f})"
                 for m in methods]
        lines.append(f"{s:>11}  " + "  ".join(f"{c:>21}" for c in cells))
    lines += ["", "Train/eval gap: training-mode minus eval-mode test accuracy, mean (min..max)",
              f"{'':>11}  " + "  ".join(f"{m:>21}" for m in methods)]
    for s in settings:
        cells = [f"{summary[s, m][3]:+.3f} ({summary[s, m][4]:+.3f}..{summary[s, m][5]:+.3f})"
                 for m in methods]
        lines.append(f"{s:>11}  " + "  ".join(f"{c:>21}" for c in cells))
    return "\n".join(lines)


def plot(results, path):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('--plot needs matplotlib: pip install "cpubn[examples]"') from exc
    summary = summarize(results)
    settings = list(dict.fromkeys(r.setting for r in results))
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.8 / len(methods)
    for panel, (ax, column, title) in enumerate(
            zip(axes, (0, 3), ("test accuracy (eval mode)", "train/eval gap"))):
        for i, m in enumerate(methods):
            values = np.array([summary[s, m][column:column + 3] for s in settings])
            x = np.arange(len(settings)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, values[:, 0], width, label=m,
                   yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]], capsize=2)
        ax.set_xticks(np.arange(len(settings)), settings)
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].set_ylim(0, 1.15)
    axes[0].legend(loc="upper center", ncol=len(methods), fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m cpubn.examples.small_batch",
        description="BatchNorm, BatchRenorm, GhostBatchNorm and precise statistics on small "
                    "and non-i.i.d. batches of the 8x8 digits.")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--samples", type=int, default=SAMPLES_PER_RUN,
                        help=f"training samples per run (default {SAMPLES_PER_RUN})")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 6,000 samples per run: a smoke test, not a result")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the table")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.quick:
        args.seeds, args.samples = 1, 6000
    if args.seeds < 1 or args.samples < 1:
        print("error: --seeds and --samples must be positive", file=sys.stderr)
        return 2
    try:
        if args.plot:
            from matplotlib.figure import Figure  # noqa: F401  (fail before training)
        data = load_digits_split("flat")
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cpubn {cpubn.__version__} | digits: {len(data.x_train)} train, "
          f"{len(data.x_test)} test | 3x100 sigmoid MLP, SGD, lr 0.5*sqrt(batch/60), "
          f"{args.samples} samples per run, {args.seeds} seed(s)", flush=True)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    start = time.perf_counter()
    results = run_all(data, seeds=tuple(range(args.seeds)), samples=args.samples,
                      progress=progress)
    print()
    print(format_table(results))
    print(f"\n({time.perf_counter() - start:.0f}s)")
    if args.plot:
        plot(results, args.plot)
        print(f"figure written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
