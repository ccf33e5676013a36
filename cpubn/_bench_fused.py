"""``python -m cpubn bench --fused``: what a fused ReLU / residual add costs on top of BN.

For every shape, layout, operation (training forward, eval forward, backward) and thread
count, these peers are timed interleaved in one process on the same preallocated
buffers (the machinery of cpubn._bench; the cpubn peers and the torch peers each
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
import json
import math
import statistics
import sys

import numpy as np

from ._bench import (EPS, MOMENTUM, _calibrate, _import_torch, _parse_shape, _parse_threads,
                     _torch_view, _warm_up, layout_axis, layout_shape, layouts_for,
                     machine_info, ops_for, shape_label, time_round_robin)

SHAPES_DEFAULT = ((32, 64, 56, 56), (32, 2048, 7, 7), (256, 1024), (1, 64, 56, 56))
SHAPES_QUICK = ((32, 64, 56, 56), (1, 64, 56, 56))
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


def _cpubn_peers(cpubn, buf, layout, op):
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
    xt, rt, dyt = (_torch_view(torch, a, layout) for a in (x, r, dy))
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
    # Two groups, each timed round-robin on its own: the call after a torch call runs
    # slower (torch's idle OpenMP threads keep spinning for a while), which would load the
    # cpubn peer that happens to follow torch in the rotation.
    groups = [_cpubn_peers(cpubn, buf, layout, op)]
    errors = {}
    if torch is not None:
        try:
            groups.append(_torch_peers(torch, buf, layout, op))
        except Exception as exc:  # report it, benchmark the others
            errors["torch"] = repr(exc)
    samples = {}
    for fns in groups:
        seconds = {}
        for name in list(fns):
            try:
                _warm_up(fns[name])             # first touch of the buffers
                seconds[name] = _warm_up(fns[name])[1]
            except Exception as exc:
                errors[name] = repr(exc)
                del fns[name]
        # One number of calls per sample for every peer: with cache-resident buffers, a
        # peer timed over more back-to-back calls would see warmer caches than the others.
        number = _calibrate(statistics.median(seconds.values())) if seconds else 1
        samples.update(time_round_robin(fns, dict.fromkeys(fns, number), repeats, budget_s))
    medians = {name: 1e3 * statistics.median(s) for name, s in samples.items() if s}
    ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS
              if a in medians and b in medians}
    return {"shape": list(buf.shape), "layout": layout, "op": op, "dtype": buf.dtype.name,
            "threads": n_threads, "size_bytes": buf.nbytes, "median_ms": medians,
            "ratios": ratios, "errors": errors,
            "samples_ms": {name: [1e3 * t for t in s] for name, s in samples.items()}}


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def format_report(report):
    m, cfg = report["machine"], report["config"]
    lines = [f"cpubn {m['cpubn']} fused BN+ReLU bench on {m['cpu']} ({m['usable_cpus']} usable "
             f"CPUs); numpy {m['numpy']}, torch {m['torch'] or 'not installed'}; dtype "
             f"{cfg['dtype']}; medians of up to {cfg['repeats']} interleaved repeats"]
    peers = [p for p in PEERS if any(p in r["median_ms"] for r in report["results"])]
    ratio_names = [f"{a}/{b}" for a, b in RATIOS
                   if any(f"{a}/{b}" in r["ratios"] for r in report["results"])]
    for n in cfg["threads"]:
        records = [r for r in report["results"] if r["threads"] == n]
        lines += ["", f"== {n} thread{'s' if n > 1 else ''}: times in ms =="]
        head = f"{'shape':<14} {'layout':<6} {'op':<8} " + " ".join(f"{p:>11}" for p in peers)
        lines.append(head)
        for r in records:
            lines.append(f"{shape_label(r['shape']):<14} {r['layout']:<6} {r['op']:<8} "
                         + " ".join(f"{_fmt(r['median_ms'].get(p), 3):>11}" for p in peers))
        lines += ["", f"== {n} thread{'s' if n > 1 else ''}: ratios (same run) =="]
        lines.append(f"{'shape':<14} {'layout':<6} {'op':<8} "
                     + " ".join(f"{name:>17}" for name in ratio_names))
        for r in records:
            lines.append(f"{shape_label(r['shape']):<14} {r['layout']:<6} {r['op']:<8} "
                         + " ".join(f"{_fmt(r['ratios'].get(name)):>17}"
                                    for name in ratio_names))
        for op in OPS:
            values = [r["ratios"]["fused/bn"] for r in records
                      if r["op"] == op and "fused/bn" in r["ratios"]]
            if values:
                lines.append(f"  {op}: median fused/bn {statistics.median(values):.2f} over "
                             f"{len(values)} cases")
        for r in records:
            for name, error in r["errors"].items():
                lines.append(f"  ! {shape_label(r['shape'])} {r['layout']} {r['op']} "
                             f"{name}: {error}")
    lines += ["", "bn: cpubn BN alone (out=); fused: activation='relu'; +res: with a residual "
                  "add; unfused: cpubn BN then NumPy add/maximum in place; torch: F.batch_norm "
                  "then F.relu(inplace=True) (backward: threshold_backward + "
                  "native_batch_norm_backward)."]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench --fused",
        description="Time cpubn's fused BN+ReLU (and BN+residual+ReLU) against BN alone, "
                    "the unfused NumPy sequence and PyTorch, interleaved in one process.")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--shape", type=_parse_shape, action="append", metavar="N,C[,H,W...]",
                   help="benchmark this shape (NCHW notation) instead of the set; repeatable")
    p.add_argument("--threads", type=_parse_threads, metavar="N[,N...]",
                   help="thread counts (default: cpubn.get_num_threads())")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    p.add_argument("--repeats", type=int, metavar="R", help="interleaved repeats per case")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    """``python -m cpubn bench --fused [options]``; argv without ``--fused``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    import cpubn

    torch = None if args.no_torch else _import_torch()
    repeats = args.repeats or (5 if args.quick else 11)
    budget_s = None if args.repeats else (0.5 if args.quick else 1.5)
    shapes = list(dict.fromkeys(args.shape or (SHAPES_QUICK if args.quick else SHAPES_DEFAULT)))
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    threads = args.threads or [cpubn.get_num_threads()]
    dtype = np.dtype(args.dtype)
    report = {"machine": machine_info(cpubn, torch),
              "config": {"dtype": dtype.name, "threads": threads, "repeats": repeats,
                         "shapes": [list(s) for s in shapes], "layouts": list(layouts)},
              "results": []}
    torch_threads = torch.get_num_threads() if torch is not None else None
    rng = np.random.default_rng(args.seed)
    try:
        for shape in shapes:
            buf = FusedBuffers(shape, dtype, rng)
            for n in threads:
                if torch is not None:
                    torch.set_num_threads(n)
                with cpubn.threads(n):
                    for layout in layouts_for(shape, layouts):
                        for op in ops_for(shape, OPS):
                            print(f"{shape_label(shape)} {layout} {op}, {n} thread(s)",
                                  file=sys.stderr, flush=True)
                            report["results"].append(
                                run_case(cpubn, torch, buf, layout, op, n, repeats, budget_s))
            del buf
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = any(name in r["errors"] for r in report["results"]
                 for name in ("bn", "fused", "fused+res", "unfused", "unfused+res"))
    return 1 if failed else 0
