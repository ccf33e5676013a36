"""``python -m cpubn bench --sync``: the cost of SyncBatchNorm against BatchNorm.

Run without MPI, it relaunches itself as ``mpiexec -n P python -m mpi4py -m cpubn bench
--sync ...`` (P = --processes, default 2).  Every process then times, interleaved, a
training step (forward + backward, preallocated outputs) of a local BatchNorm and of a
SyncBatchNorm on its own slice of the given per-process shape, and the bare Allgather of
one exchange (7 + 2C doubles).  A repeat's time is the slowest process's (a synchronized
step waits for it), after a barrier; the report gives medians, the ratio sync / local, and
the share of the sync step spent in its two collectives (2 x the bare Allgather).
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from .harness import add_plot_option, add_size_options, paired_ratios, parse_shape
from .plot import bar, matplotlib_missing, save_ratio_plot

CHILD_ENV = "CPUBN_BENCH_SYNC_CHILD"
DEFAULT_SHAPES = ((32, 64, 56, 56), (8, 16))
QUICK_SHAPES = ((8, 64, 28, 28), (8, 16))


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m cpubn bench --sync",
        description="SyncBatchNorm step time against BatchNorm under mpiexec, and the "
                    "share of its collectives.")
    p.add_argument("--processes", type=int, default=2, help="MPI processes (default 2)")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="N,C[,H,W...]",
                   help="per-process input shape (channels-first notation); repeatable "
                        "(default 32,64,56,56 and 8,16)")
    p.add_argument("--layout", choices=("nchw", "nhwc", "both"), default="both")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads per process (default: CPUs / processes, at least 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats (default 15, --quick 5, --full 31)")
    add_size_options(p, "31 repeats (the same shapes: there is no larger set)")
    p.add_argument("--json", metavar="FILE", help="write the measurements to FILE as JSON")
    add_plot_option(p, "SyncBatchNorm's time over BatchNorm's")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.processes < 1 or (args.repeats is not None and args.repeats < 1):
        print("error: --processes and --repeats must be positive", file=sys.stderr)
        return 2
    if args.plot and matplotlib_missing():
        return 2
    if os.environ.get(CHILD_ENV) != "1":
        return _relaunch(args, argv)
    return _measure(args)


def _relaunch(args, argv):
    if importlib.util.find_spec("mpi4py") is None:     # MPI is initialized in the children
        from .._layers.sync import INSTALL_HINT
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if mpiexec is None:
        print('error: mpiexec not found (pip install "cpubn[mpi]" installs MPICH\'s)',
              file=sys.stderr)
        return 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    env = dict(os.environ, **{CHILD_ENV: "1", "OMP_NUM_THREADS": str(threads)})
    command = [mpiexec, "-n", str(args.processes), sys.executable, "-m", "mpi4py", "-m",
               "cpubn", "bench", "--sync", *argv]
    print("$ " + " ".join(command[:3] + ["python"] + command[4:]), flush=True)
    return subprocess.call(command, env=env)


def _comm_self():
    from mpi4py import MPI
    return MPI.COMM_SELF


def _slowest(comm, seconds):
    from mpi4py import MPI
    return comm.allreduce(seconds, op=MPI.MAX)


def _timed(comm, fn, inner):
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return _slowest(comm, (time.perf_counter() - start) / inner)


def _case(comm, shape, layout, repeats):
    import cpubn
    from .._layers import sync as sync_layer
    channels = shape[1]
    axis = 1 if layout == "nchw" else -1
    user_shape = shape if layout == "nchw" else (shape[0],) + shape[2:] + (shape[1],)
    rng = np.random.default_rng(comm.Get_rank())
    x = rng.standard_normal(user_shape, dtype=np.float32)
    dy = rng.standard_normal(user_shape, dtype=np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    local = cpubn.BatchNorm(channels, axis=axis)
    sync = cpubn.SyncBatchNorm(channels, axis=axis, comm=comm)
    alone = cpubn.SyncBatchNorm(channels, axis=axis, comm=_comm_self())
    row = np.zeros(7 + 2 * channels)

    def step(layer):
        def run():
            layer(x, out=y)
            layer.backward(dy, out=dx)
        return run

    def forward(layer):
        return lambda: layer(x, out=y)

    fns = {"local": step(local), "sync": step(sync), "sync alone": step(alone),
           "local forward": forward(local),
           "sync forward": forward(sync),
           "allgather": lambda: sync_layer.allgather_rows(comm, row)}
    inner = {name: 1 if x.size >= 1 << 17 else 200 for name in fns}
    inner["allgather"] = 200
    for fn in fns.values():                  # warm up: pages, caches, layouts
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_timed(comm, fn, inner[name]))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"shape": list(shape), "layout": layout, "medians_s": medians,
            "samples_s": samples}


def _measure(args):
    from mpi4py import MPI
    import cpubn
    comm = MPI.COMM_WORLD
    if args.threads:
        cpubn.set_num_threads(args.threads)
    shapes = args.shape or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeats = args.repeats or (5 if args.quick else 31 if args.full else 15)
    layouts = ("nchw", "nhwc") if args.layout == "both" else (args.layout,)
    rank = comm.Get_rank()
    if rank == 0:
        print(f"cpubn {cpubn.__version__} bench --sync: {comm.Get_size()} processes, "
              f"{cpubn.get_num_threads()} thread(s) each, float32, training step = forward + "
              f"backward with out=; medians of {repeats} interleaved repeats, each the "
              f"slowest process's time", flush=True)
        print(MPI.Get_library_version().splitlines()[0].strip())
        print(f"{'shape/process':<15} {'layout':<6} {'BatchNorm':>10} {'SyncBN':>10} "
              f"{'ratio':>6} {'fwd ratio':>9} {'SyncBN 1p':>10} {'comm share':>10} "
              f"{'Allgather':>10} {'2 colls':>8}")
    results = []
    for shape in shapes:
        for layout in layouts:
            case = _case(comm, shape, layout, repeats)
            results.append(case)
            if rank == 0:
                m = case["medians_s"]
                print(f"{'x'.join(map(str, shape)):<15} {layout:<6} "
                      f"{_ms(m['local']):>10} {_ms(m['sync']):>10} "
                      f"{m['sync'] / m['local']:>6.2f} "
                      f"{m['sync forward'] / m['local forward']:>9.2f} "
                      f"{_ms(m['sync alone']):>10} "
                      f"{max(0.0, 1 - m['sync alone'] / m['sync']):>10.1%} "
                      f"{m['allgather'] * 1e6:>8.1f}us "
                      f"{2 * m['allgather'] / m['sync']:>8.1%}", flush=True)
    if rank == 0:
        print("BatchNorm / SyncBN: median step time; ratio: SyncBN / BatchNorm (fwd ratio: "
              "forward alone); SyncBN 1p: the same step on MPI.COMM_SELF (computation and "
              "Python, no communication); comm share: 1 - SyncBN 1p / SyncBN, the time spent "
              "communicating and waiting for the other processes; Allgather: one bare "
              "exchange of 7 + 2C doubles; 2 colls: the two bare exchanges' share of the "
              "SyncBN step")
        report = {"processes": comm.Get_size(), "threads": cpubn.get_num_threads(),
                  "cpubn": cpubn.__version__, "repeats": repeats, "cases": results}
        if args.json:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=1)
        if args.plot:
            save_plot(report, args.plot)
    return 0


def save_plot(report, path):
    """SyncBatchNorm's step (and forward, and step on COMM_SELF) over BatchNorm's, per
    case, with the spread of the per-repeat ratios."""
    series = {"SyncBN step / BatchNorm step": ("sync", "local"),
              "SyncBN forward / BatchNorm forward": ("sync forward", "local forward"),
              "SyncBN step on COMM_SELF / BatchNorm step": ("sync alone", "local")}
    bars = [bar(None, None, f"{'x'.join(map(str, c['shape']))} {c['layout']}", name,
                paired_ratios(c["samples_s"][a], c["samples_s"][b]),
                median=c["medians_s"][a] / c["medians_s"][b])
            for c in report["cases"] for name, (a, b) in series.items()]
    save_ratio_plot(path, bars, title=f"cpubn {report['cpubn']}: SyncBatchNorm against "
                    f"BatchNorm, {report['processes']} processes x {report['threads']} "
                    f"thread(s), float32", xlabel="time / BatchNorm's time (x), log scale",
                    note=f"medians of {report['repeats']} interleaved repeats, each the "
                         "slowest process's time; shapes per process")


def _ms(seconds):
    return f"{seconds * 1e3:.3f}ms" if seconds < 1e-2 else f"{seconds * 1e3:.1f}ms"
