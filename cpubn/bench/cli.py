"""``python -m cpubn bench``: the command line.

The main bench's options, and the dispatch to a variant by its flag (``--fused``,
``--half``, ``--small-batch``, ``--contention``, ``--sync``): each variant module owns its
own options and ``main``.  This module imports the variants; nothing imports it but
``cpubn.bench.main`` and ``python -m cpubn``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .batchnorm import run_benchmarks, save_plot
from .harness import (DRAM_COPY_BYTES, OPS, SHAPES_DEFAULT, SHAPES_FULL, SHAPES_MLP, SHAPES_QUICK,
                      add_plot_option, emit_report, import_torch, parse_shape, parse_threads,
                      shape_label)
from .plot import matplotlib_missing
from .report import format_report

VARIANTS = {  # flag -> module of cpubn.bench
    "--fused": "fused",
    "--half": "half",
    "--small-batch": "small_batch",
    "--contention": "contention",
    "--sync": "sync",
}


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
               + "; --mlp " + " ".join(map(shape_label, SHAPES_MLP))
               + ". Batch-1 shapes are eval only. Exit status 1 if cpubn raised or "
                 "disagreed with NumPy.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    size.add_argument("--full", action="store_true", help="the whole shape set, more repeats")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="N,C[,H,W...]",
                   help="benchmark this shape (NCHW notation) instead of the set; repeatable")
    p.add_argument("--mlp", action="store_true",
                   help="the MLP grid instead of the set: (batch, features) in "
                        f"{{64..4096}} x {{128..4096}}, {len(SHAPES_MLP)} shapes, at 1 and 2 "
                        "threads unless --threads says otherwise")
    p.add_argument("--threads", type=parse_threads, metavar="N[,N...]",
                   help="thread counts, e.g. 1,2 (default: cpubn.get_num_threads(); 1,2 "
                        "with --mlp)")
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
    p.add_argument("--no-tiny", action="store_true",
                   help="skip the batch-1 per-call overhead test")
    p.add_argument("--no-onnxruntime", action="store_true",
                   help="skip onnxruntime (eval peer) even if installed")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE as JSON")
    add_plot_option(p, "cpubn's speedups over NumPy and torch")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # Size of the DRAM copy-bandwidth probe; tests shrink it.
    p.add_argument("--copy-mib", type=int, default=DRAM_COPY_BYTES // 2**20, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cpubn bench``; ``argv`` are the arguments after ``bench``.

    Returns 0, 1 when cpubn raised or disagreed with NumPy somewhere, 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    for flag, module in VARIANTS.items():
        if flag in argv:
            variant = importlib.import_module(f".{module}", __package__)
            return variant.main([arg for arg in argv if arg != flag])
    args = build_parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.plot and matplotlib_missing():
        return 2

    import cpubn

    torch = None if args.no_torch else import_torch()
    report = run_benchmarks(args, cpubn, torch)
    emit_report(report, args, format_report, save_plot)
    failed = any("error" in r["peers"].get(name, {}) or r["check"] != "ok"
                 for r in report["results"] for name in ("cpubn", "cpubn_out"))
    if report["tiny"] and any(k.startswith("cpubn") for k in report["tiny"]["errors"]):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
