"""``python -m cpubn bench``: cpubn against NumPy and PyTorch, with a bandwidth roofline.

For every shape, memory layout, operation (training forward, eval forward,
backward) and thread count, the command times these peers *interleaved in one
process* (round-robin repeats, the starting peer rotating) on the *same*
preallocated input buffers, and reports medians:

- The roofline: an operation's minimum memory traffic (forward 2 x size: read x,
  write y; backward 3 x size: read x and dy, write dx) divided by the best copy
  bandwidth at the same thread count. That bandwidth comes from a multi-threaded
  copy (``cpubn._threads.copy_parallel``) of a buffer far larger than the caches,
  probed before and after the run (copying moves 2 x size bytes: read + write).
- ``copy``: the same parallel copy of each case's input into its output buffer,
  timed with the peers: a same-size, same-buffer bound (below the roofline when
  the tensor fits in the caches).
- ``cpubn_out``: ``cpubn.batch_norm_forward`` / ``batch_norm_backward`` writing
  into a preallocated ``out=`` buffer.
- ``cpubn``: the same calls allocating their output, like the two peers below.
  Speedups against the peers compare this call (same work, allocation included).
- ``numpy``: :func:`numpy_batch_norm_forward` / :func:`numpy_batch_norm_backward`,
  plain vectorized NumPy in the input dtype, the way a user writes it (NumPy runs
  these reductions on one thread whatever ``--threads`` says).
- ``torch``: ``torch.nn.functional.batch_norm`` and
  ``torch.ops.aten.native_batch_norm_backward`` (the kernel autograd calls), with
  ``torch.set_num_threads(n)``. For layout ``nhwc`` the tensor is the NHWC array
  permuted to NCHW, i.e. ``torch.channels_last`` memory format for 4-D inputs.

A tiny call, (1, 16) eval through the ``cpubn.BatchNorm`` object, is timed in
microseconds against ``torch.nn.BatchNorm1d`` (under ``torch.no_grad()``),
``F.batch_norm`` and NumPy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

# Shapes are given in NCHW notation (N, C, *spatial); layout 'nhwc' moves C last.
SHAPES_FULL = (
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 2048, 7, 7),
    (8, 64, 112, 112),
    (256, 1024),
    (128, 64, 224),
    (64, 256, 56, 56),
    (1, 64, 56, 56),
)
SHAPES_DEFAULT = (
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 2048, 7, 7),
    (256, 1024),
    (1, 64, 56, 56),
)
SHAPES_QUICK = (
    (32, 64, 56, 56),
    (32, 2048, 7, 7),
    (1, 64, 56, 56),
)
TINY_SHAPE = (1, 16)

OPS = ("train", "eval", "backward")
LAYOUTS = ("nchw", "nhwc")
PEERS = ("copy", "cpubn_out", "cpubn", "numpy", "torch")
EPS = 1e-5
MOMENTUM = 0.1
DRAM_COPY_BYTES = 256 * 2**20

# Per mode: (most round-robin repeats, seconds after which a case stops
# repeating once it has MIN_REPEATS, repeats of the tiny call).
MODES = {
    "quick": (5, 0.4, 7),
    "default": (9, 0.8, 11),
    "full": (15, 2.0, 15),
}
MIN_REPEATS = 3
MIN_SAMPLE_S = 2e-3  # loop a call until one timing sample lasts this long


# --------------------------------------------------------------------------
# The NumPy peer: what a user writes without cpubn.
# --------------------------------------------------------------------------

def _channel_axes(ndim, axis):
    """(normalized channel axis, the other axes: those a statistic reduces over)."""
    axis = axis % ndim
    reduce_axes = tuple(i for i in range(ndim) if i != axis)
    return axis, reduce_axes


def _per_channel(v, ndim, axis):
    """A (C,) vector (or an already broadcastable one) reshaped to broadcast along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def numpy_batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                             training=True, momentum=MOMENTUM, eps=EPS, axis=1):
    """Straightforward vectorized NumPy BatchNorm in ``x``'s dtype.

    Returns ``(y, mean, invstd)``, the statistics shaped to broadcast against
    ``x``. In training, updates ``running_mean`` / ``running_var`` in place
    (unbiased variance for the running one), like PyTorch. This is the baseline
    a user would write, not an oracle: it accumulates in ``x``'s dtype.
    """
    axis, reduce_axes = _channel_axes(x.ndim, axis)
    if training:
        mean = x.mean(axis=reduce_axes, keepdims=True)
        var = x.var(axis=reduce_axes, keepdims=True)
        if running_mean is not None:
            m = x.size // x.shape[axis]
            running_mean *= 1 - momentum
            running_mean += momentum * mean.ravel()
            running_var *= 1 - momentum
            running_var += momentum * var.ravel() * (m / (m - 1))
    else:
        mean = _per_channel(running_mean, x.ndim, axis)
        var = _per_channel(running_var, x.ndim, axis)
    invstd = 1 / np.sqrt(var + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, axis)
    return y, mean, invstd


def numpy_batch_norm_backward(dy, x, mean, invstd, weight=None, axis=1):
    """Straightforward NumPy BatchNorm backward through the batch statistics.

    ``mean`` / ``invstd`` are (C,) or broadcastable (as returned by
    :func:`numpy_batch_norm_forward`). Returns ``(dx, dweight, dbias)``.
    """
    axis, reduce_axes = _channel_axes(x.ndim, axis)
    m = x.size // x.shape[axis]
    mean = _per_channel(mean, x.ndim, axis)
    invstd = _per_channel(invstd, x.ndim, axis)
    xhat = (x - mean) * invstd
    dbias = dy.sum(axis=reduce_axes)
    dweight = (dy * xhat).sum(axis=reduce_axes)
    scale = invstd if weight is None else invstd * _per_channel(weight, x.ndim, axis)
    dx = (scale / m) * (m * dy - _per_channel(dbias, x.ndim, axis)
                        - xhat * _per_channel(dweight, x.ndim, axis))
    return dx, dweight, dbias


# --------------------------------------------------------------------------
# Shapes, layouts, traffic
# --------------------------------------------------------------------------

def layout_shape(shape, layout):
    """The array shape of NCHW-notation ``shape`` in ``layout`` ('nhwc' moves C last)."""
    shape = tuple(shape)
    if layout == "nchw" or len(shape) == 2:
        return shape
    return (shape[0],) + shape[2:] + (shape[1],)


def layout_axis(layout):
    return 1 if layout == "nchw" else -1


def ops_for(shape, ops=OPS):
    """Batch-1 shapes are inference: eval only. Training needs > 1 value per channel."""
    per_channel = math.prod(shape) // shape[1]
    if shape[0] == 1 or per_channel < 2:
        return tuple(op for op in ops if op == "eval")
    return tuple(ops)


def layouts_for(shape, layouts):
    """A 2-D (N, C) array is the same in both layouts: run it once."""
    return tuple(layouts[:1]) if len(shape) == 2 else tuple(layouts)


def bytes_moved(op, nbytes):
    """Minimum DRAM traffic: forward reads x and writes y; backward reads x, dy, writes dx."""
    return (3 if op == "backward" else 2) * nbytes


def shape_label(shape):
    return "x".join(str(d) for d in shape)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def _calibrate(seconds):
    """Calls per timing sample so that one sample lasts at least MIN_SAMPLE_S."""
    return max(1, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9)))


def _time_once(fn, number):
    """Seconds per call of ``fn`` over ``number`` calls; the last result is freed after the clock stops."""
    perf_counter = time.perf_counter
    if number == 1:
        t0 = perf_counter()
        result = fn()
        t1 = perf_counter()
        del result
        return t1 - t0
    t0 = perf_counter()
    for _ in range(number):
        result = fn()
    t1 = perf_counter()
    del result
    return (t1 - t0) / number


def time_round_robin(fns, numbers, repeats, budget_s=None, min_repeats=MIN_REPEATS):
    """Time ``fns`` (name -> callable) interleaved: each round calls every peer once,
    starting one further each round. Stops after ``repeats`` rounds, or earlier once
    ``budget_s`` seconds have passed and ``min_repeats`` rounds are done.
    Returns name -> list of seconds per call."""
    names = list(fns)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                samples[name].append(_time_once(fns[name], numbers[name]))
            if (budget_s is not None and r + 1 >= min_repeats
                    and time.perf_counter() - start > budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _warm_up(fn):
    """Run once (first touch, lazy initialization); return (result, seconds)."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def time_groups(groups, repeats, budget_s, errors):
    """Time each group of peers (name -> callable) round-robin among themselves, with one
    number of calls per sample for the whole group (with cache-resident buffers, a peer
    timed over more back-to-back calls would see warmer caches than the others).  Groups
    are timed apart: the call after a torch call runs slower (torch's idle OpenMP threads
    keep spinning for a while), which would load the peer that follows torch in the
    rotation.  A peer that raises is recorded in ``errors`` and dropped.
    Returns name -> list of seconds per call."""
    samples = {}
    for fns in groups:
        seconds = {}
        for name in list(fns):
            try:
                _warm_up(fns[name])             # first touch of the buffers
                seconds[name] = _warm_up(fns[name])[1]
            except Exception as exc:  # report it, benchmark the others
                errors[name] = repr(exc)
                del fns[name]
        number = _calibrate(statistics.median(seconds.values())) if seconds else 1
        samples.update(time_round_robin(fns, dict.fromkeys(fns, number), repeats, budget_s))
    return samples


def add_sweep_options(parser):
    """The options shared by the variant benches (--fused, --half)."""
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--shape", type=_parse_shape, action="append", metavar="N,C[,H,W...]",
                        help="benchmark this shape (NCHW notation) instead of the set; "
                             "repeatable")
    parser.add_argument("--threads", type=_parse_threads, metavar="N[,N...]",
                        help="thread counts (default: cpubn.get_num_threads())")
    parser.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    parser.add_argument("--repeats", type=int, metavar="R", help="interleaved repeats per case")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip PyTorch even if installed")
    parser.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run_sweep(args, shapes_default, shapes_quick, ops, config, make_buffers, run_case,
              format_report):
    """A variant bench (--fused, --half) over its options: every (shape, threads, layout,
    op) case, buffers made once per shape (make_buffers(shape, rng)), torch's thread count
    matched and restored; run_case(cpubn, torch, buf, layout, op, n_threads, repeats,
    budget_s) returns each record.  Prints format_report(report) and writes the --json
    file; returns the report, or None after a usage error."""
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return None
    import cpubn

    torch = None if args.no_torch else _import_torch()
    repeats = args.repeats or (5 if args.quick else 11)
    budget_s = None if args.repeats else (0.5 if args.quick else 1.5)
    shapes = list(dict.fromkeys(args.shape or (shapes_quick if args.quick else shapes_default)))
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    threads = args.threads or [cpubn.get_num_threads()]
    report = {"machine": machine_info(cpubn, torch),
              "config": dict(config, threads=threads, repeats=repeats,
                             shapes=[list(s) for s in shapes], layouts=list(layouts)),
              "results": []}
    torch_threads = torch.get_num_threads() if torch is not None else None
    rng = np.random.default_rng(args.seed)
    try:
        for shape in shapes:
            buf = make_buffers(shape, rng)
            for n in threads:
                if torch is not None:
                    torch.set_num_threads(n)
                with cpubn.threads(n):
                    for layout in layouts_for(shape, layouts):
                        for op in ops_for(shape, ops):
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
    return report


def format_sweep(header, results, threads, peers, ratio_names, summarized, ops, footer):
    """The report of a variant bench (--fused, --half): per thread count, a table of median
    times (ms) of ``peers`` and one of ``ratio_names``, the median over cases of each
    ratio in ``summarized`` per op, and any errors."""
    def cells(record, key, names, width, digits):
        return " ".join(f"{'-' if record[key].get(n) is None else f'{record[key][n]:.{digits}f}':>{width}}"
                        for n in names)

    def row_label(r):
        return f"{shape_label(r['shape']):<14} {r['layout']:<6} {r['op']:<8} "

    time_width = max([11] + [len(p) + 1 for p in peers])
    ratio_width = max([11] + [len(n) + 1 for n in ratio_names])
    lines = [header]
    for n in threads:
        records = [r for r in results if r["threads"] == n]
        label = f"{n} thread{'s' if n > 1 else ''}"
        lines += ["", f"== {label}: times in ms ==",
                  f"{'shape':<14} {'layout':<6} {'op':<8} "
                  + " ".join(f"{p:>{time_width}}" for p in peers)]
        lines += [row_label(r) + cells(r, "median_ms", peers, time_width, 3) for r in records]
        lines += ["", f"== {label}: ratios (same run) ==",
                  f"{'shape':<14} {'layout':<6} {'op':<8} "
                  + " ".join(f"{name:>{ratio_width}}" for name in ratio_names)]
        lines += [row_label(r) + cells(r, "ratios", ratio_names, ratio_width, 2)
                  for r in records]
        for op in ops:
            for name in summarized:
                values = [r["ratios"][name] for r in records
                          if r["op"] == op and name in r["ratios"]]
                if values:
                    lines.append(f"  {op}: median {name} {statistics.median(values):.2f} over "
                                 f"{len(values)} cases")
        for r in records:
            for name, error in r["errors"].items():
                lines.append(f"  ! {row_label(r).rstrip()} {name}: {error}")
    return "\n".join(lines + ["", footer])


def usable_cpus():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _copy_function():
    """``copy(src_bytes, dst_bytes, n_threads)``: cpubn's parallel copy of uint8 views
    (``cpubn._threads.copy_parallel``), or NumPy's single-threaded one if cpubn lacks it."""
    try:
        from cpubn._threads import copy_parallel
    except ImportError as exc:
        print(f"warning: cpubn._threads.copy_parallel unavailable ({exc}); "
              "the roofline uses a single-threaded np.copyto", file=sys.stderr)

        def copy_parallel(src, dst, n_threads):
            np.copyto(dst, src)
    return copy_parallel


class BenchBuffers:
    """The arrays shared by every peer for one shape: x, dy, out (flat, reshaped per layout)."""

    def __init__(self, shape, dtype, rng):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        size = math.prod(shape)
        self.x = rng.standard_normal(size, dtype=self.dtype)
        self.x *= 2
        self.x += 0.5
        self.dy = rng.standard_normal(size, dtype=self.dtype)
        self.out = np.zeros(size, dtype=self.dtype)
        c = shape[1]
        self.weight = (1 + 0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.bias = (0.1 * rng.standard_normal(c)).astype(self.dtype)
        self.nbytes = self.x.nbytes

    def view(self, layout):
        s = layout_shape(self.shape, layout)
        return self.x.reshape(s), self.dy.reshape(s), self.out.reshape(s)

    def running_stats(self):
        c = self.shape[1]
        return np.zeros(c, dtype=self.dtype), np.ones(c, dtype=self.dtype)


def _torch_view(torch, a, layout):
    """A torch tensor sharing ``a``'s memory, in PyTorch's logical (N, C, *spatial) order."""
    t = torch.from_numpy(a)
    if layout == "nhwc" and a.ndim > 2:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _cpubn_peers(cpubn, buf, layout, op):
    """cpubn writing into ``buf.out`` ('cpubn_out') and allocating its output ('cpubn')."""
    x, dy, out = buf.view(layout)
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    rm, rv = buf.running_stats()
    if op == "backward":
        _, save_mean, save_invstd = cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=True, momentum=MOMENTUM, eps=EPS, axis=axis)
        return {
            "cpubn_out": lambda: cpubn.batch_norm_backward(
                dy, x, save_mean, save_invstd, w, training=True, axis=axis, out=out),
            "cpubn": lambda: cpubn.batch_norm_backward(
                dy, x, save_mean, save_invstd, w, training=True, axis=axis),
        }
    training = op == "train"
    return {
        "cpubn_out": lambda: cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS, axis=axis, out=out),
        "cpubn": lambda: cpubn.batch_norm_forward(
            x, w, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS, axis=axis),
    }


def _numpy_peer(buf, layout, op):
    x, dy, _ = buf.view(layout)
    axis, w, b = layout_axis(layout), buf.weight, buf.bias
    if op == "backward":
        _, mean, invstd = numpy_batch_norm_forward(x, w, b, axis=axis)
        return lambda: numpy_batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    rm, rv = buf.running_stats()
    return lambda: numpy_batch_norm_forward(
        x, w, b, rm, rv, training=op == "train", momentum=MOMENTUM, eps=EPS, axis=axis)


def _torch_peer(torch, buf, layout, op):
    x, dy, _ = buf.view(layout)
    xt, dyt = _torch_view(torch, x, layout), _torch_view(torch, dy, layout)
    wt, bt = torch.from_numpy(buf.weight), torch.from_numpy(buf.bias)
    rm, rv = (torch.from_numpy(v) for v in buf.running_stats())
    if op == "backward":
        _, save_mean, save_invstd = torch.native_batch_norm(xt, wt, bt, rm, rv, True, MOMENTUM, EPS)
        backward = torch.ops.aten.native_batch_norm_backward
        return lambda: backward(dyt, xt, wt, rm, rv, save_mean, save_invstd, True, EPS,
                                [True, True, True])
    batch_norm = torch.nn.functional.batch_norm
    training = op == "train"
    return lambda: batch_norm(xt, rm, rv, wt, bt, training=training, momentum=MOMENTUM, eps=EPS)


def build_peers(cpubn, torch, copy_parallel, buf, layout, op, n_threads, names=PEERS):
    """(name -> zero-argument callable running ``op``, name -> error met while preparing).

    Only the peers in ``names`` are built; ``torch`` None leaves torch out. The
    callables close over ``buf``'s arrays, so every peer reads the same memory.
    """
    fns, errors = {}, {}
    if "copy" in names:
        src, dst = buf.x.view(np.uint8), buf.out.view(np.uint8)
        fns["copy"] = lambda: copy_parallel(src, dst, n_threads)
    if "cpubn" in names or "cpubn_out" in names:
        try:
            fns.update(_cpubn_peers(cpubn, buf, layout, op))
        except Exception as exc:  # a library bug: report it, benchmark the others
            errors["cpubn"] = errors["cpubn_out"] = f"preparing failed: {exc!r}"
    if "numpy" in names:
        fns["numpy"] = _numpy_peer(buf, layout, op)
    if torch is not None and "torch" in names:
        try:
            fns["torch"] = _torch_peer(torch, buf, layout, op)
        except Exception as exc:
            errors["torch"] = repr(exc)
    fns = {name: fn for name, fn in fns.items() if name in names}
    errors = {name: e for name, e in errors.items() if name in names}
    return fns, errors


def _sample_flat(a, count=200_000):
    a = np.asarray(a).reshape(-1)
    return a[:: max(1, a.size // count)]


def _check(results, out, dtype):
    """Compare cpubn's warm-up results with NumPy's; '' when fine, else what is wrong.

    ``out`` still holds cpubn_out's result: of the peers warmed up after it, none
    writes there (the copy peer runs first).
    """
    problems = []
    ref = results.get("numpy")
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-9
    for name in ("cpubn_out", "cpubn"):
        if name not in results:
            continue
        y = results[name][0]
        if not isinstance(y, np.ndarray) or y.dtype != dtype:
            problems.append(f"{name} returned {type(y).__name__} of dtype {getattr(y, 'dtype', None)}")
            continue
        if name == "cpubn_out" and not np.shares_memory(y, out):
            problems.append("cpubn_out did not return the out= buffer")
        if y.shape != out.shape:
            problems.append(f"{name} returned shape {y.shape}, expected {out.shape}")
            continue
        if not y.flags.c_contiguous:
            problems.append(f"{name} output is not C-contiguous like its input")
        if ref is not None:
            a, r = _sample_flat(y), _sample_flat(ref[0])
            if not np.allclose(a, r, rtol=tol, atol=tol, equal_nan=True):
                err = float(np.max(np.abs(a.astype(np.float64) - r)))
                problems.append(f"{name} differs from NumPy (max abs diff {err:.3g})")
    return "; ".join(problems)


def run_case(cpubn, torch, copy_parallel, buf, layout, op, n_threads, repeats, budget_s):
    """Benchmark one (shape, layout, op, threads) case; returns its JSON record (roofline filled in later)."""
    fns, errors = build_peers(cpubn, torch, copy_parallel, buf, layout, op, n_threads)
    warm, numbers = {}, {}
    for name in list(fns):
        try:
            result, seconds = _warm_up(fns[name])
        except Exception as exc:
            errors[name] = repr(exc)
            del fns[name]
            continue
        if isinstance(result, tuple):
            warm[name] = result
        numbers[name] = _calibrate(seconds)
    check = _check(warm, buf.view(layout)[2], buf.dtype)
    del warm

    samples = time_round_robin(fns, numbers, repeats, budget_s)

    record = {
        "shape": list(buf.shape),
        "layout": layout,
        "array_shape": list(layout_shape(buf.shape, layout)),
        "axis": layout_axis(layout),
        "op": op,
        "dtype": buf.dtype.name,
        "threads": n_threads,
        "size_bytes": buf.nbytes,
        "bytes_moved": bytes_moved(op, buf.nbytes),
        "check": check or "ok",
        "peers": {},
    }
    for name in PEERS:
        if name in errors:
            record["peers"][name] = {"error": errors[name]}
        elif name in samples and samples[name]:
            s = samples[name]
            record["peers"][name] = {
                "median_ms": 1e3 * statistics.median(s),
                "min_ms": 1e3 * min(s),
                "repeats": len(s),
                "calls_per_sample": numbers[name],
                "samples_ms": [1e3 * t for t in s],
            }
    return record


def _finish_roofline(records, copy_gbps):
    """Fill roofline, GB/s and x roofline of ``records`` (one shape, one thread count).

    ``copy_gbps`` is the large-buffer copy bandwidth at their thread count; the
    best same-buffer copy of the shape is kept alongside.
    """
    copies = [r["peers"]["copy"]["min_ms"] for r in records if "min_ms" in r["peers"].get("copy", {})]
    same_buffer_gbps = 2 * records[0]["size_bytes"] / (min(copies) * 1e-3) / 1e9 if copies else None
    for r in records:
        r["copy_gbps"] = copy_gbps
        r["same_buffer_copy_gbps"] = same_buffer_gbps
        r["roofline_ms"] = r["bytes_moved"] / (copy_gbps * 1e9) * 1e3
        for p in r["peers"].values():
            if "median_ms" in p:
                p["gbps"] = r["bytes_moved"] / (p["median_ms"] * 1e-3) / 1e9
                p["x_roofline"] = p["median_ms"] / r["roofline_ms"]


def _speedups(record):
    peers = record["peers"]
    mine = peers.get("cpubn", {}).get("median_ms")
    for other in ("numpy", "torch"):
        theirs = peers.get(other, {}).get("median_ms")
        record[f"speedup_vs_{other}"] = theirs / mine if mine and theirs else None


def measure_copy_bandwidth(copy_parallel, n_threads, nbytes=DRAM_COPY_BYTES, repeats=7):
    """Best bandwidth (GB/s, counting read + write) of copying ``nbytes`` with ``n_threads``."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    copy_parallel(src, dst, n_threads)
    best = min(_time_once(lambda: copy_parallel(src, dst, n_threads), 1) for _ in range(repeats))
    return 2 * nbytes / best / 1e9


def run_tiny(cpubn, torch, dtype, repeats):
    """(1, 16) eval, the per-call overhead: microseconds per call of each peer.

    torch runs under ``torch.no_grad()``, as inference code does (cpubn keeps no graph)."""
    c = TINY_SHAPE[1]
    x = np.random.default_rng(1).standard_normal(TINY_SHAPE).astype(dtype)
    w, b = np.ones(c, dtype), np.zeros(c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    fns, errors = {}, {}
    try:
        bn = cpubn.BatchNorm(c, dtype=dtype).eval()
        fns["cpubn.BatchNorm"] = lambda: bn(x)
    except Exception as exc:
        errors["cpubn.BatchNorm"] = repr(exc)
    fns["cpubn.batch_norm"] = lambda: cpubn.batch_norm(x, rm, rv, w, b, training=False)
    fns["numpy"] = lambda: numpy_batch_norm_forward(x, w, b, rm, rv, training=False)[0]
    with contextlib.ExitStack() as stack:
        if torch is not None:
            stack.enter_context(torch.no_grad())
            module = torch.nn.BatchNorm1d(c, dtype=getattr(torch, np.dtype(dtype).name)).eval()
            xt = torch.from_numpy(x)
            wt, bt, rmt, rvt = (torch.from_numpy(v) for v in (w, b, rm, rv))
            batch_norm = torch.nn.functional.batch_norm
            fns["torch.nn.BatchNorm1d"] = lambda: module(xt)
            fns["torch F.batch_norm"] = lambda: batch_norm(xt, rmt, rvt, wt, bt, training=False)
        numbers = {}
        for name in list(fns):
            try:
                for _ in range(20):
                    _, seconds = _warm_up(fns[name])
            except Exception as exc:
                errors[name] = repr(exc)
                del fns[name]
                continue
            numbers[name] = 2 * _calibrate(seconds)
        samples = time_round_robin(fns, numbers, repeats)
    us = {name: 1e6 * statistics.median(s) for name, s in samples.items()}
    return {"shape": list(TINY_SHAPE), "dtype": np.dtype(dtype).name, "us": us, "errors": errors}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(cpubn, torch):
    affinity = usable_cpus()
    try:
        openmp = bool(cpubn.openmp_enabled())
    except Exception:
        openmp = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "cpubn": getattr(cpubn, "__version__", None),
        "openmp": openmp,
    }


def _fmt_ms(v):
    if v is None:
        return "-"
    if v < 0.1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _fmt_ratio(v, digits=2):
    if v is None:
        return "-"
    digits = min(digits, 0 if v >= 100 else 1 if v >= 10 else digits)
    return f"{v:.{digits}f}"


def _peer_cell(record, name, key="median_ms", fmt=_fmt_ms):
    p = record["peers"].get(name)
    if p is None:
        return "-"
    if "error" in p:
        return "ERR"
    return fmt(p.get(key))


COLUMNS = (  # header, width, alignment
    ("shape", 13, "<"), ("layout", 6, "<"), ("op", 8, "<"), ("roof", 6, ">"), ("copy", 6, ">"),
    ("out=", 6, ">"), ("GB/s", 5, ">"), ("xroof", 5, ">"), ("cpubn", 6, ">"), ("xroof", 5, ">"),
    ("numpy", 6, ">"), ("torch", 6, ">"), ("vs numpy", 8, ">"), ("vs torch", 8, ">"),
)


def _row(cells):
    return " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def format_table(records):
    lines = [_row([c[0] for c in COLUMNS])]
    for r in records:
        lines.append(_row([
            shape_label(r["shape"]), r["layout"], r["op"], _fmt_ms(r.get("roofline_ms")),
            _peer_cell(r, "copy"),
            _peer_cell(r, "cpubn_out"),
            _peer_cell(r, "cpubn_out", "gbps", lambda v: "-" if v is None else f"{v:.1f}"),
            _peer_cell(r, "cpubn_out", "x_roofline", _fmt_ratio),
            _peer_cell(r, "cpubn"),
            _peer_cell(r, "cpubn", "x_roofline", _fmt_ratio),
            _peer_cell(r, "numpy"),
            _peer_cell(r, "torch"),
            _fmt_ratio(r.get("speedup_vs_numpy"), 1),
            _fmt_ratio(r.get("speedup_vs_torch"), 2),
        ]))
        if r["check"] != "ok":
            lines.append(f"  ! {r['check']}")
    return "\n".join(lines)


def _median_of(values):
    values = [v for v in values if v]
    return statistics.median(values) if values else None


def format_summary(records):
    """Median speedups over shapes, per op and layout."""
    lines = []
    for op in OPS:
        for layout in LAYOUTS:
            rs = [r for r in records if r["op"] == op and r["layout"] == layout]
            if not rs:
                continue
            vs_t = _median_of(r.get("speedup_vs_torch") for r in rs)
            vs_n = _median_of(r.get("speedup_vs_numpy") for r in rs)
            lines.append(f"  {op:<8} {layout}: median over {len(rs)} shapes: "
                         f"{_fmt_ratio(vs_t)}x vs torch, {_fmt_ratio(vs_n, 1)}x vs numpy")
    return "\n".join(lines)


def format_scaling(records, threads):
    lo, hi = min(threads), max(threads)
    by_key = {}
    for r in records:
        by_key.setdefault((tuple(r["shape"]), r["layout"], r["op"]), {})[r["threads"]] = r
    lines = [f"Thread scaling {lo} -> {hi} threads (time at {lo} / time at {hi}):",
             f"  {'shape':<14}  {'layout':<6}  {'op':<8}  {'cpubn out=':>10}  {'copy':>6}"]
    for (shape, layout, op), per in by_key.items():
        if lo not in per or hi not in per:
            continue

        def ratio(name):
            a = per[lo]["peers"].get(name, {}).get("median_ms")
            b = per[hi]["peers"].get(name, {}).get("median_ms")
            return a / b if a and b else None
        lines.append(f"  {shape_label(shape):<14}  {layout:<6}  {op:<8}  "
                     f"{_fmt_ratio(ratio('cpubn_out')):>10}  {_fmt_ratio(ratio('copy')):>6}")
    return "\n".join(lines)


def format_report(report):
    m, cfg = report["machine"], report["config"]
    out = [
        f"cpubn {m['cpubn']} bench on {m['cpu']} ({m['usable_cpus']} usable CPUs), "
        f"{m['platform']}",
        f"numpy {m['numpy']}, torch {m['torch'] or 'not installed'}, OpenMP "
        f"{'on' if m['openmp'] else 'off' if m['openmp'] is False else 'unknown'}; "
        f"dtype {cfg['dtype']}; medians of up to {cfg['repeats']} interleaved repeats",
    ]
    bw = ", ".join(f"{v:.1f} GB/s at {t} thread{'s' if int(t) > 1 else ''}"
                   for t, v in report["copy_bandwidth_gbps"].items())
    out.append(f"copy bandwidth ({cfg['copy_probe_bytes'] // 2**20} MiB, read + write): {bw}")
    for n in cfg["threads"]:
        rs = [r for r in report["results"] if r["threads"] == n]
        if not rs:
            continue
        out += ["", f"== {n} thread{'s' if n > 1 else ''} ==", format_table(rs), "",
                "Summary:", format_summary(rs)]
    if len(cfg["threads"]) > 1:
        out += ["", format_scaling(report["results"], cfg["threads"])]
    tiny = report.get("tiny")
    if tiny:
        cells = ", ".join(f"{k} {v:.2f} us" for k, v in tiny["us"].items())
        out += ["", f"Tiny call {shape_label(tiny['shape'])} eval, per call: {cells}"]
        for k, v in tiny["errors"].items():
            out.append(f"  ! {k}: {v}")
    out += ["", LEGEND]
    return "\n".join(out)


LEGEND = """\
Times in ms, medians. roof: minimum traffic (forward 2x size, backward 3x size)
at the large-buffer copy bandwidth above. copy: parallel copy of the same input
into the same output buffer (cache effects included). out=: cpubn writing into a
preallocated buffer; cpubn: cpubn allocating its output, as NumPy and torch do.
GB/s and xroof: minimum traffic / time, time / roof. vs: peer time / cpubn time.
NumPy runs on one thread; torch for nhwc is channels_last. ERR: the peer raised;
'!': cpubn's result disagrees with NumPy's (details in the JSON)."""


def save_plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = report["config"]["threads"]
    fig, axes = plt.subplots(len(threads), 1, squeeze=False,
                             figsize=(max(8, 0.5 * len(report["results"]) / len(threads) + 3),
                                      4.5 * len(threads)))
    for ax, n in zip(axes[:, 0], threads):
        rs = [r for r in report["results"] if r["threads"] == n]
        labels = [f"{shape_label(r['shape'])}\n{r['layout']} {r['op']}" for r in rs]
        pos = np.arange(len(rs))
        width = 0.4
        for k, (peer, color) in enumerate((("numpy", "tab:blue"), ("torch", "tab:orange"))):
            vals = np.array([r.get(f"speedup_vs_{peer}") or 1.0 for r in rs])
            # Bars grow from 1: up where cpubn is faster, down where it is slower.
            ax.bar(pos + (k - 0.5) * width, vals - 1, width, bottom=1, label=f"vs {peer}",
                   color=color)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(pos, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup of cpubn (x)")
        ax.set_title(f"cpubn speedup, {report['config']['dtype']}, {n} thread{'s' if n > 1 else ''}"
                     f" ({report['machine']['cpu']})", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not a comma-separated list of integers")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} needs at least 2 positive dimensions (N, C, ...)")
    return shape


def _parse_threads(text):
    try:
        threads = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {text!r} is not a comma-separated list of integers")
    if not threads or min(threads) < 1:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: thread counts must be positive")
    return list(dict.fromkeys(threads))


def _parse_ops(text):
    ops = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in ops if v not in OPS]
    if not ops or bad:
        raise argparse.ArgumentTypeError(f"--ops {text!r}: choose from {','.join(OPS)}")
    return ops


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench",
        description="Time cpubn against a plain NumPy implementation and PyTorch (when "
                    "installed), with a memory-bandwidth roofline, interleaved in one process.",
        epilog="shape sets (NCHW): --quick " + " ".join(map(shape_label, SHAPES_QUICK))
               + "; default " + " ".join(map(shape_label, SHAPES_DEFAULT))
               + "; --full " + " ".join(map(shape_label, SHAPES_FULL))
               + ". Batch-1 shapes are eval only. Exit status 1 if cpubn raised or "
                 "disagreed with NumPy.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    size.add_argument("--full", action="store_true", help="the whole shape set, more repeats")
    p.add_argument("--shape", type=_parse_shape, action="append", metavar="N,C[,H,W...]",
                   help="benchmark this shape (NCHW notation) instead of the set; repeatable")
    p.add_argument("--threads", type=_parse_threads, metavar="N[,N...]",
                   help="thread counts, e.g. 1,2 (default: cpubn.get_num_threads())")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    p.add_argument("--ops", type=_parse_ops, default=list(OPS), metavar="OP[,OP...]",
                   help="subset of train,eval,backward (default: all)")
    p.add_argument("--repeats", type=int, metavar="R",
                   help="exactly R interleaved repeats per case (default: adaptive, "
                        "at most 5 / 9 / 15 for --quick / default / --full)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--fused", action="store_true",
                   help="time fused BN+ReLU and BN+residual+ReLU against BN alone, the "
                        "unfused sequence and torch instead ('--fused --help' for its options)")
    p.add_argument("--half", action="store_true",
                   help="time float16 and bfloat16 data against float32 data instead "
                        "('--half --help' for its options)")
    p.add_argument("--small-batch", action="store_true",
                   help="time BatchRenorm and GhostBatchNorm training steps against BatchNorm "
                        "('--small-batch --help' for its options)")
    p.add_argument("--contention", action="store_true",
                   help="median and 90th percentile beside a busy process it starts, at 1 "
                        "and the default thread count ('--contention --help' for its options)")
    p.add_argument("--sync", action="store_true",
                   help="relaunch under mpiexec and time SyncBatchNorm training steps against "
                        "BatchNorm ('--sync --help' for its options)")
    p.add_argument("--no-tiny", action="store_true", help="skip the (1, 16) per-call overhead test")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="bar chart of the speedups (needs matplotlib: pip install 'cpubn[plot]')")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # Size of the DRAM copy-bandwidth probe; tests shrink it.
    p.add_argument("--copy-mib", type=int, default=DRAM_COPY_BYTES // 2**20, help=argparse.SUPPRESS)
    return p


class _Progress:
    """One line per step on stderr; rewritten in place on a terminal."""

    def __init__(self, total, stream=None):
        self.total, self.done = total, 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()

    def step(self, text):
        self.done += 1
        msg = f"[{self.done}/{self.total} {time.perf_counter() - self.start:5.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\033[K" + msg)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def note(self, text):
        """A message that stays (errors), on its own line."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"bench finished in {time.perf_counter() - self.start:.1f}s\n")
        self.stream.flush()


def run_benchmarks(args, cpubn, torch, progress_stream=None):
    """Run what the parsed command line ``args`` asks for; returns the report (JSON-ready dict)."""
    mode = "quick" if args.quick else "full" if args.full else "default"
    max_repeats, budget_s, tiny_repeats = MODES[mode]
    if args.repeats is not None:
        max_repeats, budget_s, tiny_repeats = args.repeats, None, args.repeats
    shapes = list(dict.fromkeys(args.shape or {"quick": SHAPES_QUICK, "default": SHAPES_DEFAULT,
                                               "full": SHAPES_FULL}[mode]))
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    threads = args.threads or [cpubn.get_num_threads()]
    dtype = np.dtype(args.dtype)
    probe_bytes = max(1, args.copy_mib) * 2**20
    copy_parallel = _copy_function()
    report = {
        "machine": machine_info(cpubn, torch),
        "config": {"mode": mode, "dtype": dtype.name, "threads": threads, "layouts": list(layouts),
                   "ops": list(args.ops), "shapes": [list(s) for s in shapes],
                   "repeats": max_repeats, "adaptive_budget_s": budget_s,
                   "copy_probe_bytes": probe_bytes},
        "copy_bandwidth_gbps": {},
        "results": [],
        "tiny": None,
    }
    n_cases = sum(len(layouts_for(s, layouts)) * len(ops_for(s, args.ops)) for s in shapes)
    progress = _Progress(2 * len(threads) + n_cases * len(threads) + (not args.no_tiny),
                         progress_stream)
    probes = {}
    by_shape_threads = {}
    torch_threads = torch.get_num_threads() if torch is not None else None
    rng = np.random.default_rng(args.seed)
    try:
        for n in threads:
            progress.step(f"copy bandwidth, {n} thread(s)")
            probes[n] = measure_copy_bandwidth(copy_parallel, n, nbytes=probe_bytes)
        for shape in shapes:
            buf = BenchBuffers(shape, dtype, rng)
            for n in threads:
                if torch is not None:
                    torch.set_num_threads(n)
                records = by_shape_threads[shape, n] = []
                with cpubn.threads(n):
                    for layout in layouts_for(shape, layouts):
                        for op in ops_for(shape, args.ops):
                            progress.step(f"{shape_label(shape)} {layout} {op}, {n} thread(s)")
                            r = run_case(cpubn, torch, copy_parallel, buf, layout, op, n,
                                         max_repeats, budget_s)
                            _speedups(r)
                            for name, p in r["peers"].items():
                                if "error" in p:
                                    progress.note(f"{name} failed on {shape_label(shape)} {layout} "
                                                  f"{op}: {p['error']}")
                            records.append(r)
                report["results"] += records
            del buf
        for n in threads:  # a second probe: the machine may have been busy during the first
            progress.step(f"copy bandwidth again, {n} thread(s)")
            probes[n] = max(probes[n], measure_copy_bandwidth(copy_parallel, n, nbytes=probe_bytes))
            report["copy_bandwidth_gbps"][str(n)] = probes[n]
        for (shape, n), records in by_shape_threads.items():
            if records:
                _finish_roofline(records, probes[n])
        if not args.no_tiny:
            progress.step(f"tiny call {shape_label(TINY_SHAPE)}")
            with cpubn.threads(max(threads)):
                report["tiny"] = run_tiny(cpubn, torch, dtype, tiny_repeats)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    progress.close()
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cpubn bench``; ``argv`` are the arguments after ``bench``.

    Returns 0, 1 when cpubn raised or disagreed with NumPy somewhere, 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    if "--fused" in argv:
        from ._bench_fused import main as fused_main
        return fused_main([arg for arg in argv if arg != "--fused"])
    if "--half" in argv:
        from ._bench_half import main as half_main
        return half_main([arg for arg in argv if arg != "--half"])
    if "--small-batch" in argv:
        from ._bench_small_batch import main as small_batch_main
        return small_batch_main([arg for arg in argv if arg != "--small-batch"])
    if "--contention" in argv:
        from ._bench_contention import main as contention_main
        return contention_main([arg for arg in argv if arg != "--contention"])
    if "--sync" in argv:
        from ._bench_sync import main as sync_main
        return sync_main([arg for arg in argv if arg != "--sync"])
    args = build_parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed "
                  "(pip install matplotlib, or pip install 'cpubn[plot]')", file=sys.stderr)
            return 2

    import cpubn

    torch = None if args.no_torch else _import_torch()
    report = run_benchmarks(args, cpubn, torch)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        save_plot(report, args.plot)
    failed = any("error" in r["peers"].get(name, {}) or r["check"] != "ok"
                 for r in report["results"] for name in ("cpubn", "cpubn_out"))
    if report["tiny"] and any(k.startswith("cpubn") for k in report["tiny"]["errors"]):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
