"""Ioffe & Szegedy (2015), section 4.1, on scikit-learn's 8x8 digits.

The paper trains a fully-connected network with 3 hidden layers of 100 sigmoid units
(small Gaussian initial weights, softmax + cross-entropy, plain SGD on mini-batches of
60) with and without Batch Normalization before each sigmoid, and shows (Figure 1)

  (a) test accuracy against training steps: the BN network learns faster and better;
  (b, c) the 15th/50th/85th percentiles of one last-hidden-layer sigmoid's input over
      training: drifting without BN, stable with it;

and, in section 4.2, that BN tolerates much larger learning rates (its BN-x5 and
BN-x30 runs). This module repeats all three on 1,797 digits that ship with scikit-learn,
scaled to run in well under two minutes on two cores:

    python -m cpubn demo                     # or: python -m cpubn.examples.paper_mnist
    python -m cpubn demo --plot figure1.png  # the paper's three panels (needs matplotlib)

Both networks start from the same weights and see the same mini-batches (same --seed):
the only difference is the ``cpubn.BatchNorm`` layers.
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import cpubn
from cpubn.examples import nn
from cpubn.examples.data import load_digits_split, minibatches
from cpubn.examples.progress import ProgressBar

HIDDEN_LAYERS = 3
HIDDEN_UNITS = 100
BATCH_SIZE = 60
INIT_STD = 0.1  # "small random Gaussian values"
LEARNING_RATE = 0.5
LR_MULTIPLIERS = (1, 5, 30)
PERCENTILES = (15, 50, 85)
ACCURACY_TARGET = 0.9  # "steps to reach 90% test accuracy" measures training speed
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over 10 classes
STUCK_LOSS = CHANCE_LOSS / 2  # a run ending above this has not learned (see TrainingRun.status)


@dataclass
class TrainingRun:
    """What one training run recorded at every evaluation step."""
    name: str
    learning_rate: float
    steps: list = field(default_factory=list)  # evaluation steps, 0 first
    test_accuracy: list = field(default_factory=list)
    # (15th, 50th, 85th) percentile of the watched sigmoid's input over the test set
    sigmoid_input_percentiles: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)  # mean mini-batch loss since the last evaluation
    diverged_at: int | None = None  # first step with a non-finite loss
    seconds: float = 0.0

    @property
    def final_accuracy(self):
        return self.test_accuracy[-1]

    @property
    def status(self):
        """"diverged" (a non-finite loss), "stuck" (finite, but the final training loss is
        still above half that of a uniform guess: on the initial plateau, or saturated
        sigmoids) or "converged"."""
        if self.diverged_at is not None:
            return "diverged"
        return "converged" if self.train_loss[-1] < STUCK_LOSS else "stuck"

    @property
    def converged(self):
        return self.status == "converged"

    def steps_to(self, accuracy):
        """First evaluation step reaching ``accuracy`` on the test set, or None."""
        return next((s for s, a in zip(self.steps, self.test_accuracy) if a >= accuracy), None)


def build_network(batch_norm, rng):
    """64 -> 3 x (Linear -> [BatchNorm] -> Sigmoid) -> Linear -> 10 logits."""
    layers = []
    fan_in = 64
    for _ in range(HIDDEN_LAYERS):
        # A bias before BatchNorm has no effect (BN subtracts the mean): the paper drops it.
        layers.append(nn.Linear(fan_in, HIDDEN_UNITS, rng, INIT_STD, bias=not batch_norm))
        if batch_norm:
            layers.append(cpubn.BatchNorm(HIDDEN_UNITS))  # (N, C) input: features on axis 1
        layers.append(nn.Sigmoid())
        fan_in = HIDDEN_UNITS
    layers.append(nn.Linear(fan_in, 10, rng, INIT_STD))
    return layers


def sigmoid_input(layers, x):
    """Input of the last hidden layer's sigmoids, (N, 100), computed in eval mode."""
    last_sigmoid = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Sigmoid))
    with nn.eval_mode(layers):
        return nn.forward(layers[:last_sigmoid], x)


def train(batch_norm, data, steps, learning_rate=LEARNING_RATE, seed=0, eval_every=None,
          unit=0, progress=False):
    """Train one network with plain SGD; evaluate on the test set every ``eval_every`` steps.

    The seed fixes the initial weights and the mini-batch order, so the baseline and the
    BatchNorm network (built from the same random stream) start from the same weights and
    see the same batches. A non-finite loss stops the run (``diverged_at``).
    """
    eval_every = eval_every or max(1, steps // 50)
    init_rng, batch_rng = np.random.default_rng(seed).spawn(2)
    layers = build_network(batch_norm, init_rng)
    run = TrainingRun("BatchNorm" if batch_norm else "baseline", learning_rate)

    def evaluate(step, losses):
        run.steps.append(step)
        run.test_accuracy.append(float(np.mean(nn.predict(layers, data.x_test) == data.y_test)))
        watched = sigmoid_input(layers, data.x_test)[:, unit]
        run.sigmoid_input_percentiles.append(np.percentile(watched, PERCENTILES).tolist())
        run.train_loss.append(float(np.mean(losses)) if losses else CHANCE_LOSS)

    start = time.perf_counter()
    batches = minibatches(len(data.x_train), BATCH_SIZE, batch_rng)
    bar = ProgressBar(steps, f"{run.name:>9} lr={learning_rate:<4g}", enabled=progress)
    with nn.single_threaded_blas():
        evaluate(0, [])
        losses = []
        for step in range(1, steps + 1):
            batch = next(batches)
            logits = nn.forward(layers, data.x_train[batch])
            loss, dlogits = nn.softmax_cross_entropy(logits, data.y_train[batch])
            losses.append(loss)
            if not np.isfinite(loss):
                run.diverged_at = step
                evaluate(step, losses)
                break
            nn.backward(layers, dlogits)
            nn.sgd_step(layers, learning_rate)  # also clears every gradient, BatchNorm's included
            if step % eval_every == 0 or step == steps:
                evaluate(step, losses)
                losses = []
            bar.update(note=f"test acc {run.test_accuracy[-1]:.3f}")
    run.seconds = time.perf_counter() - start
    bar.close(note=f"test acc {run.final_accuracy:.3f}")
    return run


def compare(data, steps, learning_rate=LEARNING_RATE, seed=0, eval_every=None, unit=0,
            progress=False):
    """Baseline and BatchNorm networks, same seed: {"baseline": run, "BatchNorm": run}."""
    return {run.name: run for run in (
        train(batch_norm, data, steps, learning_rate, seed, eval_every, unit, progress)
        for batch_norm in (False, True))}


def learning_rate_sweep(data, steps, learning_rate=LEARNING_RATE, multipliers=LR_MULTIPLIERS,
                        seed=0, eval_every=None, done=None, progress=False):
    """Both networks at learning_rate x each multiplier: [(multiplier, run), ...].

    ``done`` maps (name, learning rate) to runs already trained with the same settings.
    """
    done = done or {}
    results = []
    for multiplier in multipliers:
        lr = learning_rate * multiplier
        for batch_norm in (False, True):
            name = "BatchNorm" if batch_norm else "baseline"
            run = done.get((name, lr)) or train(batch_norm, data, steps, lr, seed, eval_every,
                                                progress=progress)
            results.append((multiplier, run))
    return results


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def _rows(n_evals, n_rows):
    return sorted(set(np.linspace(0, n_evals - 1, n_rows).round().astype(int).tolist()))


def _fmt_steps(n):
    return "never" if n is None else str(n)


def format_comparison(runs, n_test, rows=11):
    base, bn = runs["baseline"], runs["BatchNorm"]
    lines = [f"Test accuracy on {n_test} held-out digits (same initial weights, same mini-batches)",
             f"{'step':>7}  {'baseline':>9}  {'BatchNorm':>9}"]
    for i in _rows(min(len(base.steps), len(bn.steps)), rows):
        lines.append(f"{base.steps[i]:>7}  {base.test_accuracy[i]:>9.3f}  {bn.test_accuracy[i]:>9.3f}")
    lines.append(f"final test accuracy: baseline {base.final_accuracy:.3f}, BatchNorm "
                 f"{bn.final_accuracy:.3f} after {base.steps[-1]} steps at lr {base.learning_rate:g}")
    base_speed, bn_speed = (_fmt_steps(run.steps_to(ACCURACY_TARGET)) for run in (base, bn))
    lines.append(f"steps to {ACCURACY_TARGET:.0%} test accuracy: baseline {base_speed}, "
                 f"BatchNorm {bn_speed}")
    lines.append(f"training time: baseline {base.seconds:.1f}s, BatchNorm {bn.seconds:.1f}s")
    return "\n".join(lines)


def format_percentiles(runs, unit, rows=6):
    base, bn = runs["baseline"], runs["BatchNorm"]
    p = "/".join(str(q) for q in PERCENTILES)
    lines = [f"Input of last-hidden-layer sigmoid #{unit} over the test set: {p}th percentiles",
             f"{'step':>7}  {'baseline':>22}  {'BatchNorm':>22}"]
    for i in _rows(min(len(base.steps), len(bn.steps)), rows):
        cells = ["  ".join(f"{v:6.2f}" for v in run.sigmoid_input_percentiles[i]) for run in (base, bn)]
        lines.append(f"{base.steps[i]:>7}  {cells[0]:>22}  {cells[1]:>22}")
    lines.append("(eval mode; at step 0 BatchNorm's running statistics are still 0 and 1, so the "
                 "two networks agree)")
    return "\n".join(lines)


def format_sweep(results):
    lines = [f"Learning-rate sweep ({results[0][1].steps[-1] if results else 0} steps each, same seed)",
             f"{'network':>9}  {'lr':>6}  {'x':>3}  {'status':>9}  {'final acc':>9}  "
             f"{f'steps to {ACCURACY_TARGET:.0%}':>12}"]
    for multiplier, run in results:
        lines.append(f"{run.name:>9}  {run.learning_rate:>6g}  {multiplier:>3}  {run.status:>9}  "
                     f"{run.final_accuracy:>9.3f}  {_fmt_steps(run.steps_to(ACCURACY_TARGET)):>12}")
    lines.append(f"(diverged: the loss became inf/NaN; stuck: final training loss above "
                 f"{STUCK_LOSS:.2f}, half that of a uniform guess)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------
def _require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('--plot needs matplotlib: pip install matplotlib '
                          '(or pip install "cpubn[examples]")') from exc
    return Figure


def plot_figure(runs, path, unit=0):
    """The paper's Figure 1: (a) test accuracy, (b) baseline and (c) BN sigmoid-input percentiles."""
    Figure = _require_matplotlib()  # no pyplot: no GUI backend is touched
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_acc, ax_base, ax_bn = fig.subplots(1, 3)
    for run, style, label in ((runs["baseline"], "--", "Without BN"), (runs["BatchNorm"], "-", "With BN")):
        ax_acc.plot(run.steps, run.test_accuracy, style, label=label)
    ax_acc.set(title="(a) test accuracy", xlabel="training steps", ylim=(0.0, 1.0))
    ax_acc.legend(loc="lower right")
    low, high = np.inf, -np.inf
    panels = ((ax_base, runs["baseline"], "(b) without BN"), (ax_bn, runs["BatchNorm"], "(c) with BN"))
    for ax, run, title in panels:
        traces = np.asarray(run.sigmoid_input_percentiles)
        for column, q in enumerate(PERCENTILES):
            ax.plot(run.steps, traces[:, column], color="C0", alpha=0.7 if q == 50 else 0.4,
                    label=f"{q}th")
        low, high = min(low, np.nanmin(traces)), max(high, np.nanmax(traces))
        ax.set(title=f"{title}: sigmoid #{unit} input, {'/'.join(map(str, PERCENTILES))}th pct.",
               xlabel="training steps")
    for ax in (ax_base, ax_bn):
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m cpubn demo",
        description="Batch Normalization paper, section 4.1 (Figure 1) and the learning-rate "
                    "claim, on scikit-learn's 8x8 digits with cpubn.BatchNorm.")
    parser.add_argument("--steps", type=int, default=5000, help="SGD steps per run (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                        help=f"base learning rate (default {LEARNING_RATE})")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate on the test set every N steps (default steps/50)")
    parser.add_argument("--unit", type=int, default=0, choices=range(HIDDEN_UNITS), metavar="0..99",
                        help="which last-hidden-layer sigmoid to trace (default 0)")
    parser.add_argument("--sweep-steps", type=int, default=None,
                        help="SGD steps per learning-rate-sweep run (default: --steps)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the learning-rate sweep")
    parser.add_argument("--plot", metavar="FILE.png", help="write the paper's three-panel figure")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    """``python -m cpubn demo``: print the comparison, percentile traces and LR sweep."""
    args = _parser().parse_args(argv)
    if args.steps < 1 or (args.sweep_steps is not None and args.sweep_steps < 1):
        print("error: --steps and --sweep-steps must be positive", file=sys.stderr)
        return 2
    try:
        if args.plot:
            _require_matplotlib()  # fail before training, not after
        data = load_digits_split("flat")
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    progress = not args.quiet
    print(f"cpubn {getattr(cpubn, '__version__', '?')} | digits: {len(data.x_train)} train, "
          f"{len(data.x_test)} test | 3x100 sigmoid MLP, batch {BATCH_SIZE}, SGD lr {args.lr:g}, "
          f"seed {args.seed}", flush=True)
    runs = compare(data, args.steps, args.lr, args.seed, args.eval_every, args.unit, progress)
    print()
    print(format_comparison(runs, len(data.x_test)))
    print()
    print(format_percentiles(runs, args.unit))

    if not args.no_sweep:
        sweep_steps = args.sweep_steps or args.steps
        same_settings = sweep_steps == args.steps
        done = {(r.name, r.learning_rate): r for r in runs.values()} if same_settings else {}
        print(flush=True)
        results = learning_rate_sweep(data, sweep_steps, args.lr, seed=args.seed,
                                      eval_every=args.eval_every, done=done, progress=progress)
        print(format_sweep(results))
    if args.plot:
        plot_figure(runs, args.plot, args.unit)
        print(f"\nfigure written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
