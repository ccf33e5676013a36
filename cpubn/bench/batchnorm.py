"""``python -m cpubn bench``: cpubn against NumPy and PyTorch, with a bandwidth roofline.

For every shape, memory layout, operation (training forward, eval forward,
backward) and thread count, the command times these peers *interleaved in one
process* (round-robin repeats, the starting peer rotating) on the *same*
preallocated input buffers, and reports medians:

- The roofline: an operation's minimum memory traffic (forward 2 x size: read x,
  write y; backward 3 x size: read x and dy, write dx) divided by the best copy
  bandwidth at the same thread count. That bandwidth comes from a multi-threaded
  copy (``cpubn.bench._copy.copy_parallel``) of a buffer far larger than the caches,
  probed before and after the run (copying moves 2 x size bytes: read + write).
- ``copy``: the same parallel copy of each case's input into a buffer of its own (not
  the ``out=`` buffer, which the copy would warm for the call after it), timed with
  the peers: a same-size, same-input bound (below the roofline when
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

- ``torch_other`` (backward, 4-D/5-D): PyTorch's backward in its other memory format;
  ``vs torch`` for backward compares against the faster of the two.
- ``onnxruntime`` (eval, nchw; with the ``onnx`` extra): one BatchNormalization node in
  an InferenceSession with the case's thread count.

Tiny calls, eval through the ``cpubn.BatchNorm`` object at batch 1 ((1, 16), (1, 64, 56,
56), (1, 256, 14, 14)), are timed in microseconds against ``torch.nn.BatchNorm1d/2d``
(under ``torch.no_grad()``), ``F.batch_norm``, onnxruntime and NumPy: the per-call
overhead edge inference pays once per layer per image.

The report ends with the targets of issue 11 (training forward <= 1.8x the copy in
median and <= 3.0x worst, eval <= 1.1x / 1.5x, backward <= 2.2x / 3.5x, all with
``out=``; allocating <= 1.15x ``out=`` from 16 MiB; 1 -> 2 threads >= 1.7x from 16 MiB;
every op at least as fast as PyTorch), each marked met or missed with its numbers, and,
for the 2-D cases (``--mlp``: batch 64 to 4096 x features 128 to 4096, at 1 and 2
threads), issue 36's: every case at least as fast as torch, each op's median at least
1.3x torch per thread count, and train and backward from 4M elements at least 1.4x
faster on 2 threads than on 1.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import numpy as np

from .harness import (LAYOUTS, OPS, SHAPES_DEFAULT, SHAPES_FULL, SHAPES_MLP, SHAPES_QUICK,
                      busy_reason, bytes_moved, calibrate, copy_function, layout_axis, layout_shape,
                      layouts_for, machine_info, measure_copy_bandwidth, ops_for,
                      paired_ratios, shape_label, time_round_robin, warm_up)
from .peers import (PEERS, BenchBuffers, build_peers, check_results, import_onnxruntime,
                    numpy_batch_norm_forward, onnxruntime_session)
from .plot import bar, save_ratio_plot

TINY_SHAPE = (1, 16)
TINY_SHAPES = (TINY_SHAPE, (1, 64, 56, 56), (1, 256, 14, 14))


# Per mode: (most round-robin repeats, seconds after which a case stops
# repeating once it has MIN_REPEATS, repeats of the tiny call).
MODES = {
    "quick": (5, 0.4, 7),
    "default": (9, 0.8, 11),
    "full": (15, 2.0, 15),
}
def run_case(cpubn, torch, copy_parallel, buf, layout, op, n_threads, repeats, budget_s,
             ort=None):
    """Benchmark one (shape, layout, op, threads) case; returns its JSON record (roofline filled in later)."""
    fns, errors = build_peers(cpubn, torch, copy_parallel, buf, layout, op, n_threads, ort=ort)
    warm, numbers = {}, {}
    for name in list(fns):
        try:
            result, seconds = warm_up(fns[name])
        except Exception as exc:
            errors[name] = repr(exc)
            del fns[name]
            continue
        if isinstance(result, tuple):
            warm[name] = result
        numbers[name] = calibrate(seconds)
    check = check_results(warm, buf.view(layout)[2], buf.dtype)
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


def finish_roofline(records, copy_gbps):
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


def speedups(record):
    """Speedups of cpubn (allocating) over NumPy and torch: the ratio of medians, the
    per-repeat ratios (``speedup_samples_vs_*``, for the plot's spread), and ``busy``:
    why the case's numbers are not results (see harness.busy_reason), or None."""
    peers = record["peers"]
    mine = peers.get("cpubn", {}).get("median_ms")
    for other in ("numpy", "torch", "onnxruntime"):
        name = other
        if other == "torch" and "median_ms" in peers.get("torch_other", {}) and (
                "median_ms" not in peers.get("torch", {})
                or peers["torch_other"]["median_ms"] < peers["torch"]["median_ms"]):
            name = "torch_other"              # the faster of PyTorch's two layouts
        theirs = peers.get(name, {}).get("median_ms")
        record[f"speedup_vs_{other}"] = theirs / mine if mine and theirs else None
        record[f"speedup_samples_vs_{other}"] = (
            paired_ratios(peers[name]["samples_ms"], peers["cpubn"]["samples_ms"])
            if mine and theirs else [])
    out_ms = peers.get("cpubn_out", {}).get("median_ms")
    copy_ms = peers.get("copy", {}).get("median_ms")
    record["x_copy"] = out_ms / copy_ms if out_ms and copy_ms else None
    record["alloc_over_out"] = mine / out_ms if mine and out_ms else None
    record["busy"] = busy_reason({name: p["samples_ms"] for name, p in peers.items()
                                  if "samples_ms" in p and name in ("copy", "cpubn", "cpubn_out")},
                                 copy_name="copy")


def plot_bars(report):
    """The --plot bars: cpubn's speedup over NumPy and torch, per case; a row of panels
    per thread count, a column per operation."""
    bars = []
    for r in report["results"]:
        for other in ("numpy", "torch"):
            bars.append(bar(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}", r["op"],
                            f"{shape_label(r['shape'])} {r['layout']}", f"vs {other}",
                            r.get(f"speedup_samples_vs_{other}", []), busy=r.get("busy"),
                            median=r.get(f"speedup_vs_{other}")))
    return bars


def save_plot(report, path):
    m, cfg = report["machine"], report["config"]
    bars = [b for b in plot_bars(report) if b is not None]
    save_ratio_plot(
        path, bars, series=["vs numpy", "vs torch"], cols=[op for op in OPS if op in cfg["ops"]],
        title=f"cpubn {m['cpubn']} speedup (peer time / cpubn time), {cfg['dtype']}, "
              f"{m['cpu']} ({m['usable_cpus']} CPUs)",
        xlabel="speedup of cpubn (x), log scale; > 1: cpubn is faster",
        note=f"medians of up to {cfg['repeats']} interleaved repeats; numpy on one thread; "
             f"torch {m['torch'] or 'not installed'} (channels_last for nhwc)")


def run_tiny(cpubn, torch, dtype, repeats, shape=TINY_SHAPE, ort=None):
    """Eval of one batch-1 input through the layer objects, the per-call overhead:
    microseconds per call of each peer.

    torch runs under ``torch.no_grad()``, as inference code does (cpubn keeps no graph);
    onnxruntime runs one BatchNormalization node on one thread."""
    c = shape[1]
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
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
    if ort is not None:
        try:
            session = onnxruntime_session(ort, shape, dtype, w, b, rm, rv, 1)
            feed = {"x": x}
            fns["onnxruntime"] = lambda: session.run(None, feed)[0]
        except Exception as exc:
            errors["onnxruntime"] = repr(exc)
    with contextlib.ExitStack() as stack:
        if torch is not None:
            stack.enter_context(torch.no_grad())
            module_class = torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d
            module = module_class(c, dtype=getattr(torch, np.dtype(dtype).name)).eval()
            xt = torch.from_numpy(x)
            wt, bt, rmt, rvt = (torch.from_numpy(v) for v in (w, b, rm, rv))
            batch_norm = torch.nn.functional.batch_norm
            fns[f"torch.nn.{module_class.__name__}"] = lambda: module(xt)
            fns["torch F.batch_norm"] = lambda: batch_norm(xt, rmt, rvt, wt, bt, training=False)
        numbers = {}
        for name in list(fns):
            try:
                for _ in range(20):
                    _, seconds = warm_up(fns[name])
            except Exception as exc:
                errors[name] = repr(exc)
                del fns[name]
                continue
            numbers[name] = 2 * calibrate(seconds)
        samples = time_round_robin(fns, numbers, repeats)
    us = {name: 1e6 * statistics.median(s) for name, s in samples.items()}
    return {"shape": list(shape), "dtype": np.dtype(dtype).name, "us": us, "errors": errors}


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
    mlp = getattr(args, "mlp", False)
    default_shapes = SHAPES_MLP if mlp else {"quick": SHAPES_QUICK, "default": SHAPES_DEFAULT,
                                             "full": SHAPES_FULL}[mode]
    shapes = list(dict.fromkeys(args.shape or default_shapes))
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    threads = args.threads or ([1, 2] if mlp else [cpubn.get_num_threads()])
    dtype = np.dtype(args.dtype)
    probe_bytes = max(1, args.copy_mib) * 2**20
    copy_parallel = copy_function()
    ort = None if getattr(args, "no_onnxruntime", False) else import_onnxruntime()
    report = {
        "machine": machine_info(cpubn, torch),
        "config": {"mode": mode, "mlp": mlp, "dtype": dtype.name, "threads": threads,
                   "layouts": list(layouts),
                   "ops": list(args.ops), "shapes": [list(s) for s in shapes],
                   "repeats": max_repeats, "adaptive_budget_s": budget_s,
                   "copy_probe_bytes": probe_bytes},
        "copy_bandwidth_gbps": {},
        "copy_probes_gbps": {},          # before and after the cases: a busy machine differs
        "results": [],
        "tiny": None,
        "tiny_calls": [],
    }
    report["machine"]["onnxruntime"] = ort[0].__version__ if ort is not None else None
    n_cases = sum(len(layouts_for(s, layouts)) * len(ops_for(s, args.ops)) for s in shapes)
    progress = _Progress(2 * len(threads) + n_cases * len(threads)
                         + (0 if args.no_tiny else len(TINY_SHAPES)), progress_stream)
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
                                         max_repeats, budget_s, ort)
                            speedups(r)
                            for name, p in r["peers"].items():
                                if "error" in p:
                                    progress.note(f"{name} failed on {shape_label(shape)} {layout} "
                                                  f"{op}: {p['error']}")
                            records.append(r)
                report["results"] += records
            del buf
        for n in threads:  # a second probe: the machine may have been busy during the first
            progress.step(f"copy bandwidth again, {n} thread(s)")
            again = measure_copy_bandwidth(copy_parallel, n, nbytes=probe_bytes)
            report["copy_probes_gbps"][str(n)] = [probes[n], again]
            probes[n] = max(probes[n], again)
            report["copy_bandwidth_gbps"][str(n)] = probes[n]
        for (shape, n), records in by_shape_threads.items():
            if records:
                finish_roofline(records, probes[n])
        if not args.no_tiny:
            for tiny_shape in TINY_SHAPES:
                progress.step(f"tiny call {shape_label(tiny_shape)}")
                with cpubn.threads(max(threads)):
                    report["tiny_calls"].append(run_tiny(cpubn, torch, dtype, tiny_repeats,
                                                         tiny_shape, ort))
            report["tiny"] = report["tiny_calls"][0]
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    progress.close()
    return report
