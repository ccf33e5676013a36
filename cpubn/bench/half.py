"""``python -m cpubn bench --half``: half-precision data against float32 data.

For every shape, layout, operation (training forward, eval forward, backward) and thread
count, cpubn's BatchNorm is timed on the same values stored as float32, float16 and (with
ml_dtypes installed) bfloat16, interleaved in one process, writing into preallocated
``out=`` buffers; PyTorch's ``F.batch_norm`` / ``native_batch_norm_backward`` on the same
dtypes (its "mixed type": half data with float32 parameters) form a second group.  The
parameters are float32 throughout.  The reported ratio ``float32/float16`` is float32's
median time over float16's: the speedup from moving half the bytes.
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

SHAPES_DEFAULT = ((32, 64, 56, 56), (32, 256, 28, 28), (32, 2048, 7, 7), (256, 1024))
SHAPES_QUICK = ((32, 64, 56, 56),)
SHAPES_FULL = ((32, 64, 56, 56), (32, 256, 56, 56), (32, 256, 28, 28), (32, 512, 28, 28),
               (32, 2048, 7, 7), (8, 64, 112, 112), (256, 1024))
SHAPES = {"quick": SHAPES_QUICK, "default": SHAPES_DEFAULT, "full": SHAPES_FULL}
OPS = ("train", "eval", "backward")


def half_dtypes():
    """The data dtypes compared: float32, float16 and bfloat16 if ml_dtypes is installed."""
    dtypes = [np.dtype(np.float32), np.dtype(np.float16)]
    try:
        import ml_dtypes
        dtypes.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    return dtypes


class HalfBuffers:
    """x, dy and out of one shape in every compared dtype (the same values, rounded)."""

    def __init__(self, shape, dtypes, rng):
        self.shape = tuple(shape)
        size = math.prod(shape)
        x = rng.standard_normal(size, dtype=np.float32) * 2 + 0.5
        dy = rng.standard_normal(size, dtype=np.float32)
        self.arrays = {d.name: {"x": x.astype(d), "dy": dy.astype(d), "out": np.zeros(size, d)}
                       for d in dtypes}
        c = shape[1]
        self.weight = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        self.bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
        self.float32_bytes = 4 * size

    def view(self, dtype_name, layout, *names):
        s = layout_shape(self.shape, layout)
        return [self.arrays[dtype_name][name].reshape(s) for name in names]


def cpubn_peer(cpubn, buf, dtype_name, layout, op):
    x, dy, out = buf.view(dtype_name, layout, "x", "dy", "out")
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    c = buf.shape[1]
    if op == "backward":
        _, mean, invstd = cpubn.batch_norm_forward(x, w, b, training=True, axis=axis)
        return lambda: cpubn.batch_norm_backward(dy, x, mean, invstd, w, True, axis, out=out)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    training = op == "train"
    return lambda: cpubn.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, axis, out=out)


def _torch_peer(torch, buf, dtype_name, layout, op):
    x, dy = buf.view(dtype_name, layout, "x", "dy")
    to_torch = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[dtype_name]
    # torch has no NumPy bfloat16: the tensors are made from float32 and cast once (the
    # cast keeps the channels-last strides of the nhwc view).
    xt, dyt = (torch_view(torch, a.astype(np.float32), layout).to(to_torch) for a in (x, dy))
    wt, bt = torch.from_numpy(buf.weight), torch.from_numpy(buf.bias)
    c = buf.shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    if op == "backward":
        _, save_mean, save_invstd = torch.native_batch_norm(xt, wt, bt, rm, rv, True,
                                                            MOMENTUM, EPS)
        bn_backward = torch.ops.aten.native_batch_norm_backward
        return lambda: bn_backward(dyt, xt, wt, rm, rv, save_mean, save_invstd, True, EPS,
                                   [True, True, True])
    training = op == "train"
    return lambda: torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=training,
                                                  momentum=MOMENTUM, eps=EPS)


def run_case(cpubn, torch, buf, layout, op, n_threads, repeats, budget_s):
    """Time one (shape, layout, op, threads) case; returns its JSON record."""
    dtype_names = list(buf.arrays)
    groups = [{f"cpubn_{d}": cpubn_peer(cpubn, buf, d, layout, op) for d in dtype_names}]
    errors = {}
    if torch is not None:
        torch_group = {}
        for d in dtype_names:
            try:
                torch_group[f"torch_{d}"] = _torch_peer(torch, buf, d, layout, op)
            except Exception as exc:  # report it, benchmark the others
                errors[f"torch_{d}"] = repr(exc)
        groups.append(torch_group)
    samples = time_groups(groups, repeats, budget_s, errors)
    medians = {name: 1e3 * statistics.median(s) for name, s in samples.items() if s}
    ratios = {}
    for peer in ("cpubn", "torch"):
        for d in dtype_names[1:]:
            if f"{peer}_float32" in medians and f"{peer}_{d}" in medians:
                ratios[f"{peer} float32/{d}"] = medians[f"{peer}_float32"] / medians[f"{peer}_{d}"]
    for d in dtype_names:
        if f"cpubn_{d}" in medians and f"torch_{d}" in medians:
            ratios[f"torch/cpubn {d}"] = medians[f"torch_{d}"] / medians[f"cpubn_{d}"]
    return {"shape": list(buf.shape), "layout": layout, "op": op, "threads": n_threads,
            "float32_bytes": buf.float32_bytes, "median_ms": medians, "ratios": ratios,
            "errors": errors,
            "samples_ms": {name: [1e3 * t for t in s] for name, s in samples.items()}}


def format_report(report):
    m, cfg = report["machine"], report["config"]
    results = report["results"]
    header = (f"cpubn {m['cpubn']} half-precision bench on {machine_label(m)}; numpy "
              f"{m['numpy']}, torch {m['torch'] or 'not installed'}; "
              f"dtypes {', '.join(cfg['dtypes'])} (float32 parameters); medians of up to "
              f"{cfg['repeats']} interleaved repeats")
    peers = list(dict.fromkeys(k for r in results for k in r["median_ms"]))
    ratio_names = list(dict.fromkeys(k for r in results for k in r["ratios"]))
    footer = ("cpubn_<dtype>: cpubn.batch_norm / batch_norm_backward into out=; "
              "torch_<dtype>: F.batch_norm / native_batch_norm_backward; a/b: a's time over "
              "b's (float32/float16 > 1: float16 is faster).")
    return format_sweep(header, results, cfg["threads"], peers, ratio_names,
                        [name for name in ratio_names if name.startswith("cpubn")], OPS, footer)


def save_plot(report, path):
    """The speedup of half-precision data over float32 data, for cpubn and torch."""
    m, cfg = report["machine"], report["config"]
    pairs = {f"{peer} float32/{d}": (f"{peer}_float32", f"{peer}_{d}")
             for peer in ("cpubn", "torch") for d in cfg["dtypes"][1:]}
    save_ratio_plot(
        path, sweep_bars(report["results"], pairs), cols=OPS,
        title=f"cpubn {m['cpubn']}: half-precision data against float32 data, "
              f"{m['cpu']} ({m['usable_cpus']} CPUs)",
        xlabel="float32 time / half-precision time (x), log scale; > 1: half precision is faster",
        note=f"medians of up to {cfg['repeats']} interleaved repeats; float32 parameters; "
             f"torch {m['torch'] or 'not installed'}")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench --half",
        description="Time cpubn on float16 and bfloat16 data against float32 data (and "
                    "PyTorch on the same dtypes), interleaved in one process.")
    add_sweep_options(p)
    return p


def main(argv=None):
    """``python -m cpubn bench --half [options]``; argv without ``--half``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    dtypes = half_dtypes()
    if args.plot and matplotlib_missing():
        return 2
    report = run_sweep(args, SHAPES, OPS,
                       {"dtypes": [d.name for d in dtypes]},
                       lambda shape, rng: HalfBuffers(shape, dtypes, rng), run_case,
                       format_report, save_plot)
    if report is None:
        return 2
    failed = any(name.startswith("cpubn") for r in report["results"] for name in r["errors"])
    return 1 if failed else 0
