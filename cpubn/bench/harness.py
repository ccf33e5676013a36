"""The bench harness: what every ``python -m cpubn bench`` variant plugs into.

Shapes and layouts (shapes are written in NCHW notation; layout ``nhwc`` moves C last),
timing (peers called round-robin in one process, the starting peer rotating, each
sample long enough to read the clock), the parallel copy behind the roofline, the
machine description, the command-line options every sweep shares, and ``run_sweep``,
the loop over (shape, threads, layout, op) of a variant.  Imports go one way: the
peers, reports, plots, variants and the command line import this module, never the
reverse.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from .._core.machine import data_caches, usable_cpus

# Shapes are given in NCHW notation (N, C, *spatial); layout 'nhwc' moves C last.
SHAPES_FULL = (
    (32, 64, 56, 56),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
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
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (256, 1024),
    (1, 64, 56, 56),
)
SHAPES_QUICK = (
    (32, 64, 56, 56),
    (32, 2048, 7, 7),
    (1, 64, 56, 56),
)

# The MLP grid (--mlp): 2-D (batch, features) inputs, the BatchNorm1d layers of NumPy
# models on CPU servers.
MLP_BATCHES = (64, 256, 1024, 4096)
MLP_FEATURES = (128, 512, 1024, 4096)
SHAPES_MLP = tuple((n, c) for n in MLP_BATCHES for c in MLP_FEATURES)

OPS = ("train", "eval", "backward")
LAYOUTS = ("nchw", "nhwc")
EPS = 1e-5
MOMENTUM = 0.1
DRAM_COPY_BYTES = 256 * 2**20
MIN_REPEATS = 3
MIN_SAMPLE_S = 2e-3  # loop a call until one timing sample lasts this long


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

def calibrate(seconds):
    """Calls per timing sample so that one sample lasts at least MIN_SAMPLE_S."""
    return max(1, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9)))


def time_once(fn, number):
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
                samples[name].append(time_once(fns[name], numbers[name]))
            if (budget_s is not None and r + 1 >= min_repeats
                    and time.perf_counter() - start > budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def warm_up(fn):
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
                warm_up(fns[name])             # first touch of the buffers
                seconds[name] = warm_up(fns[name])[1]
            except Exception as exc:  # report it, benchmark the others
                errors[name] = repr(exc)
                del fns[name]
        number = calibrate(statistics.median(seconds.values())) if seconds else 1
        samples.update(time_round_robin(fns, dict.fromkeys(fns, number), repeats, budget_s))
    return samples


# A case is "busy" (the machine was visibly busy while it ran: its ratios are not results)
# when the copy baseline's median is this much slower than its own best repeat, or when a
# peer's slowest repeat is this much slower than its fastest.
BUSY_COPY_SLOWDOWN = 1.5
BUSY_SPREAD = 3.0


def busy_reason(samples, copy_name=None):
    """Why the case whose per-peer samples (name -> seconds list) these are cannot be
    trusted, or None.  ``copy_name``: the peer whose time should not vary (a plain copy)."""
    copy = samples.get(copy_name) if copy_name else None
    if copy and len(copy) >= 2 and min(copy) > 0:
        slowdown = statistics.median(copy) / min(copy)
        if slowdown >= BUSY_COPY_SLOWDOWN:
            return f"copy baseline {slowdown:.1f}x slower than its best repeat"
    spreads = {name: max(s) / min(s) for name, s in samples.items()
               if name != copy_name and len(s) >= 2 and min(s) > 0}
    if spreads:
        name = max(spreads, key=spreads.get)
        if spreads[name] >= BUSY_SPREAD:
            return f"{name}'s repeats spread {spreads[name]:.1f}x"
    return None


def paired_ratios(numerators, denominators):
    """Per-repeat ratios of two peers timed in the same rounds (samples paired by index)."""
    return [a / b for a, b in zip(numerators, denominators) if b > 0]


def add_size_options(parser, full_help="the whole shape set, more repeats"):
    """--quick and --full (exclusive), which every bench accepts."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    size.add_argument("--full", action="store_true", help=full_help)


def add_plot_option(parser, what="the ratios"):
    """--plot FILE.png, which every bench accepts (the figure: cpubn.bench.plot)."""
    parser.add_argument("--plot", metavar="FILE.png",
                        help=f"a figure of {what}, with their spread over the repeats "
                             "(needs matplotlib: pip install 'cpubn[plot]')")


# The sweeps' modes: (most interleaved repeats, seconds after which a case stops repeating
# once it has MIN_REPEATS).
SWEEP_MODES = {"quick": (5, 0.5), "default": (11, 1.5), "full": (21, 3.0)}


def add_sweep_options(parser):
    """The options shared by the sweep benches (--fused, --half)."""
    add_size_options(parser, "more shapes and up to 21 repeats")
    parser.add_argument("--shape", type=parse_shape, action="append", metavar="N,C[,H,W...]",
                        help="benchmark this shape (NCHW notation) instead of the set; "
                             "repeatable")
    parser.add_argument("--threads", type=parse_threads, metavar="N[,N...]",
                        help="thread counts (default: cpubn.get_num_threads())")
    parser.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    parser.add_argument("--repeats", type=int, metavar="R", help="interleaved repeats per case")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip PyTorch even if installed")
    parser.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    add_plot_option(parser)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run_sweep(args, shapes, ops, config, make_buffers, run_case, format_report,
              save_plot=None):
    """A sweep bench (--fused, --half) over its options: every (shape, threads, layout,
    op) case, buffers made once per shape (make_buffers(shape, rng)), torch's thread count
    matched and restored; run_case(cpubn, torch, buf, layout, op, n_threads, repeats,
    budget_s) returns each record, with its per-peer ``samples_ms``, to which ``busy`` is
    added (see busy_reason).  ``shapes``: mode ('quick', 'default', 'full') -> shape set.
    Prints format_report(report), writes the --json file and the --plot figure
    (save_plot(report, path)); returns the report, or None after a usage error."""
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return None
    import cpubn

    torch = None if args.no_torch else import_torch()
    mode = "quick" if args.quick else "full" if args.full else "default"
    repeats, budget_s = SWEEP_MODES[mode]
    if args.repeats:
        repeats, budget_s = args.repeats, None
    shapes = list(dict.fromkeys(args.shape or shapes[mode]))
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    threads = args.threads or [cpubn.get_num_threads()]
    report = {"machine": machine_info(cpubn, torch),
              "config": dict(config, mode=mode, threads=threads, repeats=repeats,
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
                            record = run_case(cpubn, torch, buf, layout, op, n, repeats,
                                              budget_s)
                            record["busy"] = busy_reason(record.get("samples_ms", {}))
                            report["results"].append(record)
            del buf
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    emit_report(report, args, format_report, save_plot)
    return report


def emit_report(report, args, format_report, save_plot=None):
    """What every bench does with its report: print it, write the --json file and draw the
    --plot figure (save_plot(report, path))."""
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot and save_plot is not None:
        save_plot(report, args.plot)


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def copy_function():
    """``copy(src_bytes, dst_bytes, n_threads)``: cpubn's parallel copy of uint8 views
    (``cpubn.bench._copy.copy_parallel``), or NumPy's single-threaded one if cpubn lacks it."""
    try:
        from ._copy import copy_parallel
    except ImportError as exc:
        print(f"warning: cpubn.bench._copy.copy_parallel unavailable ({exc}); "
              "the roofline uses a single-threaded np.copyto", file=sys.stderr)

        def copy_parallel(src, dst, n_threads):
            np.copyto(dst, src)
    return copy_parallel


def torch_view(torch, a, layout):
    """A torch tensor sharing ``a``'s memory, in PyTorch's logical (N, C, *spatial) order."""
    t = torch.from_numpy(a)
    if layout == "nhwc" and a.ndim > 2:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t

def measure_copy_bandwidth(copy_parallel, n_threads, nbytes=DRAM_COPY_BYTES, repeats=7):
    """Best bandwidth (GB/s, counting read + write) of copying ``nbytes`` with ``n_threads``."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    copy_parallel(src, dst, n_threads)
    best = min(time_once(lambda: copy_parallel(src, dst, n_threads), 1) for _ in range(repeats))
    return 2 * nbytes / best / 1e9


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _kernel_isa(cpubn):
    try:
        return cpubn._kernels.runtime.kernel_isa()
    except Exception:
        return None


def _size_label(nbytes):
    if nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} MiB"
    return f"{nbytes >> 10} KiB"


def machine_label(m):
    """'AMD EPYC (2 usable CPUs; avx2 kernels; L2 512 KiB, L3 8 MiB)': the CPU, and what
    decides how fast the same kernels run on it, for the reports' first line."""
    parts = [f"{m['usable_cpus']} usable CPUs"]
    if m.get("kernels"):
        parts.append(f"{m['kernels']} kernels")
    caches = m.get("caches") or {}
    sizes = [f"{level} {_size_label(caches[level])}" for level in ("L2", "L3") if level in caches]
    if sizes:
        parts.append(", ".join(sizes))
    return f"{m['cpu']} ({'; '.join(parts)})"


def machine_info(cpubn, torch):
    affinity = usable_cpus()
    try:
        openmp = bool(cpubn.openmp_enabled())
    except Exception:
        openmp = None
    return {
        "cpu": _cpu_model(),
        "kernels": _kernel_isa(cpubn),
        "caches": data_caches(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "cpubn": getattr(cpubn, "__version__", None),
        "openmp": openmp,
    }


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not a comma-separated list of integers")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"shape {text!r} needs at least 2 positive dimensions (N, C, ...)")
    return shape


def parse_threads(text):
    try:
        threads = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {text!r} is not a comma-separated list of integers")
    if not threads or min(threads) < 1:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: thread counts must be positive")
    return list(dict.fromkeys(threads))
