"""``python -m cpubn bench --small-batch``: the cost of a BatchRenorm and a GhostBatchNorm
training step against a BatchNorm step on the same data.

Each layer runs a training forward (``out=`` a preallocated buffer) and its backward
(``out=`` another), the three layers interleaved in every repeat so that a noisy machine
slows them alike; the first repeats are warm-up.  Reported: median milliseconds and the
ratio to BatchNorm's median, for the forward, the backward and the whole step.
"""
import argparse
import statistics
import time

import numpy as np

import cpubn

from .harness import add_plot_option, add_size_options, paired_ratios, parse_shape, shape_label
from .plot import bar, matplotlib_missing, save_ratio_plot

DEFAULT_SHAPE = (256, 64, 28, 28)


def layers_for(channels, axis, ghost_batch_size):
    return {"BatchNorm": cpubn.BatchNorm(channels, axis=axis),
            "BatchRenorm": cpubn.BatchRenorm(channels, axis=axis),
            f"GhostBatchNorm({ghost_batch_size})": cpubn.GhostBatchNorm(
                channels, ghost_batch_size, axis=axis)}


def measure(shape, layout, ghost_batch_size, repeats, warmup=3, seed=0):
    """{layer name: (forward seconds list, backward seconds list)}."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal(shape, dtype=np.float32)
    axis = 1
    if layout == "nhwc":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
        axis = -1
    y, dx = np.empty_like(x), np.empty_like(x)
    layers = layers_for(shape[1], axis, ghost_batch_size)
    times = {name: ([], []) for name in layers}
    for repeat in range(warmup + repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            layer(x, out=y)
            middle = time.perf_counter()
            layer.backward(dy, out=dx)
            end = time.perf_counter()
            if repeat >= warmup:
                times[name][0].append(middle - start)
                times[name][1].append(end - middle)
    return times


def format_report(shape, layout, times):
    base = times["BatchNorm"]
    base_fwd, base_bwd = statistics.median(base[0]), statistics.median(base[1])
    base_step = statistics.median(f + b for f, b in zip(*base))
    lines = [f"{layout} {shape} float32, {cpubn.get_num_threads()} threads, "
             f"{len(base[0])} interleaved repeats (median ms, ratio to BatchNorm)",
             f"{'layer':>20}  {'forward':>14}  {'backward':>14}  {'step':>14}"]
    for name, (fwd, bwd) in times.items():
        f, b = statistics.median(fwd), statistics.median(bwd)
        s = statistics.median(a + c for a, c in zip(fwd, bwd))
        lines.append(f"{name:>20}  {f * 1e3:7.2f} {f / base_fwd:5.2f}x  "
                     f"{b * 1e3:7.2f} {b / base_bwd:5.2f}x  {s * 1e3:7.2f} {s / base_step:5.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cpubn bench --small-batch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default=DEFAULT_SHAPE,
                        metavar="N,C[,H,W...]", help="channels-first shape (default 256,64,28,28)")
    parser.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    parser.add_argument("--ghost", type=int, default=32, help="ghost batch size (default 32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats (default 20, --quick 5, --full 60)")
    add_size_options(parser, "60 repeats (one shape: there is no larger set)")
    add_plot_option(parser, "each layer's time over BatchNorm's")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else \
        5 if args.quick else 60 if args.full else 20
    if repeats < 1 or args.ghost < 1 or len(args.shape) < 2:
        parser.error("--repeats and --ghost must be positive, --shape needs N and C")
    if args.plot and matplotlib_missing():
        return 2
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    results = {}
    for i, layout in enumerate(layouts):
        if i:
            print()
        results[layout] = measure(args.shape, layout, args.ghost, repeats)
        print(format_report(args.shape, layout, results[layout]), flush=True)
    if args.plot:
        save_plot(args.shape, results, repeats, args.plot)
    return 0


def save_plot(shape, results, repeats, path):
    """Each layer's forward, backward and step time over BatchNorm's, per layout."""
    bars = []
    for layout, times in results.items():
        base_fwd, base_bwd = times["BatchNorm"]
        for name, (fwd, bwd) in times.items():
            steps = [f + b for f, b in zip(fwd, bwd)]
            base_steps = [f + b for f, b in zip(base_fwd, base_bwd)]
            for series, a, b in (("forward", fwd, base_fwd), ("backward", bwd, base_bwd),
                                 ("step", steps, base_steps)):
                bars.append(bar(None, layout, name, series, paired_ratios(a, b),
                                median=statistics.median(a) / statistics.median(b)))
    save_ratio_plot(path, bars, title=f"cpubn {cpubn.__version__}: small-batch layers against "
                    f"BatchNorm, {shape_label(shape)} float32, {cpubn.get_num_threads()} threads",
                    xlabel="time / BatchNorm's time (x), log scale; < 1: faster",
                    note=f"medians of {repeats} interleaved repeats; training forward and "
                         "backward with out=")
