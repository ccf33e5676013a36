"""Command line: ``python -m cpubn bench`` (speed on this machine) and
``python -m cpubn demo`` (the Batch Normalization paper's experiment on digits)."""
import sys

USAGE = """usage: python -m cpubn COMMAND [options]

commands:
  bench    measure cpubn against the memory-bandwidth roofline, NumPy and PyTorch
           ('bench --sync': SyncBatchNorm against BatchNorm under mpiexec -n 2)
  demo     train a NumPy network with and without BatchNorm (Ioffe & Szegedy 2015, Fig. 1);
           'demo --convnet': a small conv net in channels-first and channels-last layouts;
           'demo --small-batch': BatchRenorm, GhostBatchNorm and precise statistics on
           small and non-i.i.d. batches
  info     print the build: version, OpenMP, threads, half-precision conversions

'python -m cpubn COMMAND --help' describes a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench.cli import main as bench_main
        return bench_main(rest)
    if command == "demo":
        if "--convnet" in rest:
            from .examples.convnet import main as convnet_main
            return convnet_main([arg for arg in rest if arg != "--convnet"])
        if "--small-batch" in rest:
            from .examples.small_batch import main as small_batch_main
            return small_batch_main([arg for arg in rest if arg != "--small-batch"])
        from .examples.paper_mnist import main as demo_main
        return demo_main(rest)
    if command == "info":
        import cpubn
        from ._kernels.forward import half_conversions
        print(f"cpubn {cpubn.__version__}: OpenMP {'on' if cpubn.openmp_enabled() else 'off'}, "
              f"{cpubn.get_num_threads()} threads; half-precision conversions: "
              + ", ".join(f"{name} {kind}" for name, kind in half_conversions().items()))
        return 0
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
