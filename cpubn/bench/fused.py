"""``python -m cpubn bench --fused``: what a fused ReLU / residual add costs on top of BN.

For every shape, layout, operation (training forward, eval forward, backward) and thread
count, these peers are timed interleaved in one process on the same preallocated
buffers (cpubn.bench.harness; the cpubn peers and the torch peers each
round-robin among themselves), and their medians reported:

- ``bn``: cpubn's BatchNorm alone, writing into ``out=`` (the cost to match);
- ``fused``: cpubn with ``activation="relu"`` (backward: through the mask of y);
- ``fused+res``: cpubn with ``activation="relu"`` and a residual (backward: dx and
  dresidual);
- ``unfused``: cpubn's BN into ``out=``, then ``np.maximum(out, 0, out=out)``
  (backward: ``np.multiply(dy, y > 0, out=g)``, then cpubn's backward of g);
- ``unfused+res``: the same with ``np.add(out, r, out=out)`` before the maximum
  (backward: the residual's gradient is g itself);
- ``torch_bn``, ``torch``, ``torch+res``: ``F.batch_norm`` alone, followed by
  ``F.relu(inplace=True)``, and by ``add_(r)`` then ``relu_()`` (backward:
  ``threshold_backward`` then ``native_batch_norm_backward``), at the same thread count.

The ratios ``fused / bn`` and ``unfused / bn`` are the measured cost of the fusion and
of not fusing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import numpy as np

from .harness import (EPS, MOMENTUM, add_sweep_options, layout_axis, layout_shape, machine_label,
                      run_sweep, time_groups, torch_view)
from .plot import matplotlib_missing, save_ratio_plot, sweep_bars
from .report import format_sweep

SHAPES_DEFAULT = ((32, 64, 56, 56), (32, 2048, 7, 7), (256, 1024), (1, 64, 56, 56))
SHAPES_QUICK = ((32, 64, 56, 56), (1, 64, 56, 56))
SHAPES_FULL = ((32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7),
               (8, 64, 112, 112), (256, 1024), (1, 64, 56, 56))
SHAPES = {"quick": SHAPES_QUICK, "default": SHAPES_DEFAULT, "full": SHAPES_FULL}
OPS = ("train", "eval", "backward")
PEERS = ("bn", "fused", "fused+res", "unfused", "unfused+res", "torch_bn", "torch",
         "torch+res")
RATIOS = (("fused", "bn"), ("fused+res", "bn"), ("unfused", "bn"), ("unfused+res", "bn"),
          ("torch", "torch_bn"), ("torch+res", "torch_bn"))


class FusedBuffers:
    """x, residual, dy and output buffers of one shape, shared by every peer."""

    def __init__(self, shape, dtype, rng):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        size = math.prod(shape)
        self.x = rng.standard_normal(size, dtype=self.dtype) * 2 + 0.5
        self.residual = rng.standard_normal(size, dtype=self.dtype)
        self.dy = rng.standard_normal(size, dtype=self.dtype)
        self.out = np.zeros(size, dtype=self.dtype)
        self.grad = np.zeros(size, dtype=self.dtype)        # g = masked dy (unfused backward)
        c = shape[1]
        self.weight = (1 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.nbytes = self.x.nbytes

    def view(self, layout, *names):
        s = layout_shape(self.shape, layout)
        return [getattr(self, name).reshape(s) for name in names]


def cpubn_peers(cpubn, buf, layout, op):
    x, r, dy, out, grad = buf.view(layout, "x", "residual", "dy", "out", "grad")
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    c = buf.shape[1]
    rm, rv = np.zeros(c, buf.dtype), np.ones(c, buf.dtype)
    forward = cpubn.batch_norm_forward
    backward = cpubn.batch_norm_backward
    if op == "backward":
        # The forward outputs whose sign is the mask, kept apart from the out buffer.
        y_relu, mean, invstd = forward(x, w, b, training=True, axis=axis, activation="relu")
        y_res = forward(x, w, b, training=True, axis=axis, activation="relu", residual=r)[0]

        def unfused(y):
            np.multiply(dy, y > 0, out=grad)
            return backward(grad, x, mean, invstd, w, True, axis, out=out)

        return {
            "bn": lambda: backward(dy, x, mean, invstd, w, True, axis, out=out),
            "fused": lambda: backward(dy, x, mean, invstd, w, True, axis, out=out,
                                      activation="relu", y=y_relu),
            "fused+res": lambda: backward(dy, x, mean, invstd, w, True, axis, out=out,
                                          activation="relu", y=y_res, residual=True),
            "unfused": lambda: unfused(y_relu),
            "unfused+res": lambda: unfused(y_res),
        }
    training = op == "train"

    def bn(**fused):
        return forward(x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS,
                       axis=axis, out=out, **fused)

    def unfused(residual):
        bn()
        if residual:
            np.add(out, r, out=out)
        return np.maximum(out, 0, out=out)

    return {
        "bn": bn,
        "fused": lambda: bn(activation="relu"),
        "fused+res": lambda: bn(activation="relu", residual=r),
        "unfused": lambda: unfused(False),
        "unfused+res": lambda: unfused(True),
    }


def _torch_peers(torch, buf, layout, op):
    x, r, dy = buf.view(layout, "x", "residual", "dy")
    xt, rt, dyt = (torch_view(torch, a, layout) for a in (x, r, dy))
    wt, bt = torch.from_numpy(buf.weight), torch.from_numpy(buf.bias)
    c = buf.shape[1]
    rm, rv = torch.zeros(c, dtype=wt.dtype), torch.ones(c, dtype=wt.dtype)
    F = torch.nn.functional
    if op == "backward":
        y, save_mean, save_invstd = torch.native_batch_norm(xt, wt, bt, rm, rv, True,
                                                            MOMENTUM, EPS)
        y_relu = torch.relu(y)
        y_res = torch.relu(y + rt)
        bn_backward = torch.ops.aten.native_batch_norm_backward
        threshold_backward = torch.ops.aten.threshold_backward

        def through(grad):
            return bn_backward(grad, xt, wt, rm, rv, save_mean, save_invstd, True, EPS,
                               [True, True, True])

        def with_residual():
            grad = threshold_backward(dyt, y_res, 0)       # also the residual's gradient
            return through(grad) + (grad,)

        return {
            "torch_bn": lambda: through(dyt),
            "torch": lambda: through(threshold_backward(dyt, y_relu, 0)),
            "torch+res": with_residual,
        }
    training = op == "train"

    def bn():
        return F.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=MOMENTUM, eps=EPS)

    return {
        "torch_bn": bn,
        "torch": lambda: F.relu(bn(), inplace=True),
        "torch+res": lambda: bn().add_(rt).relu_(),
    }


def run_case(cpubn, torch, buf, layout, op, n_threads, repeats, budget_s):
    """Time one (shape, layout, op, threads) case; returns its JSON record."""
    groups = [cpubn_peers(cpubn, buf, layout, op)]
    errors = {}
    if torch is not None:
        try:
            groups.append(_torch_peers(torch, buf, layout, op))
        except Exception as exc:  # report it, benchmark the others
            errors["torch"] = repr(exc)
    samples = time_groups(groups, repeats, budget_s, errors)
    medians = {name: 1e3 * statistics.median(s) for name, s in samples.items() if s}
    ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS
              if a in medians and b in medians}
    return {"shape": list(buf.shape), "layout": layout, "op": op, "dtype": buf.dtype.name,
            "threads": n_threads, "size_bytes": buf.nbytes, "median_ms": medians,
            "ratios": ratios, "errors": errors,
            "samples_ms": {name: [1e3 * t for t in s] for name, s in samples.items()}}


def format_report(report):
    m, cfg = report["machine"], report["config"]
    results = report["results"]
    header = (f"cpubn {m['cpubn']} fused BN+ReLU bench on {machine_label(m)}; numpy "
              f"{m['numpy']}, torch {m['torch'] or 'not installed'}; dtype "
              f"{cfg['dtype']}; medians of up to {cfg['repeats']} interleaved repeats")
    peers = [p for p in PEERS if any(p in r["median_ms"] for r in results)]
    ratio_names = [f"{a}/{b}" for a, b in RATIOS if any(f"{a}/{b}" in r["ratios"] for r in results)]
    footer = ("bn: cpubn BN alone (out=); fused: activation='relu'; +res: with a residual "
              "add; unfused: cpubn BN then NumPy add/maximum in place; torch: F.batch_norm "
              "then F.relu(inplace=True) (backward: threshold_backward + "
              "native_batch_norm_backward).")
    return format_sweep(header, results, cfg["threads"], peers, ratio_names, ["fused/bn"], OPS,
                        footer)


def save_plot(report, path):
    """The cost of fusing (fused / BN alone) and of not fusing (unfused / BN alone)."""
    m, cfg = report["machine"], report["config"]
    pairs = {f"{a}/{b}": (a, b) for a, b in RATIOS[:4]}
    save_ratio_plot(
        path, sweep_bars(report["results"], pairs), cols=OPS,
        title=f"cpubn {m['cpubn']}: fused BN+ReLU (+ residual) against BN alone, "
              f"{cfg['dtype']}, {m['cpu']} ({m['usable_cpus']} CPUs)",
        xlabel="time / time of BN alone (x), log scale; 1: free, < 1: faster",
        note=f"medians of up to {cfg['repeats']} interleaved repeats; unfused: cpubn's BN, "
             "then NumPy's in-place add and maximum")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench --fused",
        description="Time cpubn's fused BN+ReLU (and BN+residual+ReLU) against BN alone, "
                    "the unfused NumPy sequence and PyTorch, interleaved in one process.")
    add_sweep_options(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    return p


def main(argv=None):
    """``python -m cpubn bench --fused [options]``; argv without ``--fused``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    dtype = np.dtype(args.dtype)
    if args.plot and matplotlib_missing():
        return 2
    report = run_sweep(args, SHAPES, OPS, {"dtype": dtype.name},
                       lambda shape, rng: FusedBuffers(shape, dtype, rng), run_case,
                       format_report, save_plot)
    if report is None:
        return 2
    failed = any(name in r["errors"] for r in report["results"]
                 for name in ("bn", "fused", "fused+res", "unfused", "unfused+res"))
    return 1 if failed else 0
