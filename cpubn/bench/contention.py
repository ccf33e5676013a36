"""``python -m cpubn bench --contention``: tail latency beside a busy neighbour.

CPU servers are shared.  This bench starts one CPU-bound process of its own
(``python -c "while True: pass"``), then times single calls of cpubn at one thread and
at its default (automatic) thread setting, NumPy and PyTorch (at that thread count), interleaved
round-robin, and reports each one's median and 90th percentile.  The targets: at the
default thread count, the 90th percentile is at most 1.5x cpubn's one-thread median
measured under the same load, and the median is no worse than that one-thread median
(within the run-to-run noise, taken as 10%).  ``--quiet`` measures without the busy
process, for comparison.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

from .harness import (SHAPES_DEFAULT, SHAPES_FULL, SHAPES_QUICK, add_plot_option,
                      add_size_options, emit_report, import_torch, layouts_for, ops_for,
                      parse_shape, shape_label)
from .peers import BenchBuffers, build_peers
from .plot import bar, matplotlib_missing, save_ratio_plot

P90_TARGET = 1.5        # default-thread p90 / one-thread median
MEDIAN_NOISE = 1.10     # default-thread median / one-thread median counted as "no worse"
OPS = ("train", "eval", "backward")
BUSY_CODE = "while True: pass"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench --contention",
        description="Median and 90th-percentile call times beside one busy process: cpubn "
                    "at 1 thread and at its default thread count, NumPy, PyTorch.")
    add_size_options(p, "the whole shape set of 'bench --full', 101 samples")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="N,C[,H,W...]",
                   help="this shape (NCHW notation) instead of the set; repeatable")
    p.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    p.add_argument("--samples", type=int, metavar="K",
                   help="timed calls per peer and case (default: 41, --quick 21, --full "
                        "101; fewer for slow peers once a case has run 20 s)")
    p.add_argument("--quiet", action="store_true",
                   help="do not start the busy process (a baseline to compare with)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    add_plot_option(p, "each peer's call times over cpubn's one-thread median")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def start_busy_neighbour():
    """One CPU-bound process, started now; the caller kills it."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_CODE])
    time.sleep(0.3)                              # let the scheduler see it
    return busy


def time_case(cpubn, torch, buf, layout, op, default_threads, samples, budget_s=20.0):
    """Per-call times (seconds) of each peer, interleaved round-robin."""
    fns, errors = build_peers(cpubn, torch, None, buf, layout, op, default_threads,
                              names=("cpubn", "numpy", "torch"))
    peers = {}
    if "cpubn" in fns:
        cpubn_call = fns["cpubn"]

        def one_thread():
            with cpubn.threads(1):
                cpubn_call()

        peers["cpubn 1 thread"] = one_thread
        peers["cpubn default"] = cpubn_call      # automatic: what a user gets
    for name in ("numpy", "torch"):
        if name in fns:
            peers[name] = fns[name]
    times = {name: [] for name in peers}
    for fn in peers.values():                    # warm up: first-call costs, page faults
        fn()
    start = time.perf_counter()
    for _ in range(samples):
        for name, fn in peers.items():
            if name == "numpy" and times[name] and time.perf_counter() - start > budget_s:
                continue                         # NumPy is slow; keep the others' samples
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times, errors


def summarize(times):
    out = {}
    for name, samples in times.items():
        if samples:
            a = np.asarray(samples) * 1e3
            out[name] = {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
                         "samples": len(a)}
    one = out.get("cpubn 1 thread", {}).get("median_ms")
    default = out.get("cpubn default")
    if one and default:
        out["p90_vs_one_thread_median"] = default["p90_ms"] / one
        out["median_vs_one_thread_median"] = default["median_ms"] / one
        out["meets_target"] = bool(out["p90_vs_one_thread_median"] <= P90_TARGET
                                   and out["median_vs_one_thread_median"] <= MEDIAN_NOISE)
    return out


def _cell(stats, name):
    s = stats.get(name)
    return f"{s['median_ms']:8.3f} {s['p90_ms']:8.3f}" if s else f"{'-':>8s} {'-':>8s}"


def format_report(report):
    lines = [report["header"], "",
             f"{'shape':14s}{'layout':7s}{'op':9s}{'cpubn 1 thread':>17s}"
             f"{'cpubn default':>18s}{'p90':>7s}{'median':>7s}{'numpy':>18s}{'torch':>18s}",
             f"{'':30s}{'median      p90':>17s}{'median      p90':>18s}{'/med1':>7s}"
             f"{'/med1':>7s}{'median      p90':>18s}{'median      p90':>18s}  target"]
    for r in report["results"]:
        s = r["stats"]
        ratio_p90 = s.get("p90_vs_one_thread_median")
        ratio_med = s.get("median_vs_one_thread_median")
        verdict = "-" if ratio_p90 is None else "ok" if s["meets_target"] else "MISS"
        lines.append(
            f"{shape_label(r['shape']):14s}{r['layout']:7s}{r['op']:9s}"
            f" {_cell(s, 'cpubn 1 thread')} {_cell(s, 'cpubn default')}"
            f"{'-' if ratio_p90 is None else f'{ratio_p90:.2f}':>7s}"
            f"{'-' if ratio_med is None else f'{ratio_med:.2f}':>7s}"
            f" {_cell(s, 'numpy')} {_cell(s, 'torch')}  {verdict}")
        for name, error in r["errors"].items():
            lines.append(f"    {name} failed: {error}")
    met = [r["stats"]["meets_target"] for r in report["results"] if "meets_target" in r["stats"]]
    lines += ["", f"target (default-thread p90 <= {P90_TARGET}x and median <= "
                  f"{MEDIAN_NOISE:.2f}x the one-thread median): met in {sum(met)} of "
                  f"{len(met)} cases.  Times in ms."]
    return "\n".join(lines)


def run(args, cpubn, torch):
    shapes = list(dict.fromkeys(args.shape or (SHAPES_QUICK if args.quick else
                                               SHAPES_FULL if args.full else SHAPES_DEFAULT)))
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    samples = args.samples or (21 if args.quick else 101 if args.full else 41)
    cpubn.set_num_threads(None)                  # "default" is the automatic setting
    default_threads = cpubn.get_num_threads()
    torch_threads = None
    if torch is not None:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(default_threads)
    load = "quiet machine (no busy process started)" if args.quiet else \
        f"one busy process beside the bench ({sys.executable} -c '{BUSY_CODE}')"
    report = {"header": f"cpubn {cpubn.__version__} bench --contention: {load}; cpubn "
                        f"default = automatic (up to {default_threads} threads, fewer while "
                        f"CPUs are busy); {samples} interleaved "
                        f"single calls per peer",
              "default_threads": default_threads, "busy": not args.quiet, "results": []}
    rng = np.random.default_rng(args.seed)
    busy = None if args.quiet else start_busy_neighbour()
    try:
        for shape in shapes:
            buf = BenchBuffers(shape, np.float32, rng)
            for layout in layouts_for(shape, layouts):
                for op in ops_for(shape, OPS):
                    print(f"{shape_label(shape)} {layout} {op}", file=sys.stderr, flush=True)
                    times, errors = time_case(cpubn, torch, buf, layout, op,
                                              default_threads, samples)
                    report["results"].append({"shape": list(shape), "layout": layout,
                                              "op": op, "stats": summarize(times),
                                              "errors": errors,
                                              "samples_ms": {name: [1e3 * t for t in s]
                                                             for name, s in times.items()}})
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        if torch is not None:
            torch.set_num_threads(torch_threads)
    return report


def save_plot(report, path):
    """Every peer's single-call times over cpubn's one-thread median in the same case:
    the bar is the median, the whiskers show the tail (the p90 target is 1.5x)."""
    bars = []
    for r in report["results"]:
        samples = r["samples_ms"]
        one = r["stats"].get("cpubn 1 thread", {}).get("median_ms")
        if not one:
            continue
        for name, s in samples.items():
            bars.append(bar(None, r["op"], f"{shape_label(r['shape'])} {r['layout']}", name,
                            [t / one for t in s]))
    save_ratio_plot(path, bars, cols=OPS, title=report["header"].split(":")[0] + ": "
                    + ("quiet machine" if not report["busy"] else "beside one busy process"),
                    xlabel="call time / cpubn's one-thread median (x), log scale; < 1: faster",
                    note=report["header"].split(": ", 1)[1])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.samples is not None and args.samples < 3:
        print("error: --samples must be >= 3", file=sys.stderr)
        return 2
    if args.plot and matplotlib_missing():
        return 2
    import cpubn

    torch = None if args.no_torch else import_torch()
    report = run(args, cpubn, torch)
    emit_report(report, args, format_report, save_plot)
    return 1 if any("cpubn" in r["errors"] for r in report["results"]) else 0
