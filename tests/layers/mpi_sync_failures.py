"""Run under mpiexec by tests/layers/test_sync.py: one failure case per run (the first argument),
in which process 1 does something different from the others.

    mpiexec -n 2 python -m mpi4py tests/mpi_sync_failures.py dy_shape

Each process prints "rank R: <exception type>: <message>" for the error it gets (or
"rank R: no error"), then checks that the communicator still works with a fresh
SyncBatchNorm and prints "rank R: recovered".  Case "crash" raises an uncaught error on
process 1 outside cpubn: under ``python -m mpi4py`` the whole job must end.
"""
import math
import os
import sys

import numpy as np
from mpi4py import MPI

import cpubn

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
REPORT_DIR = os.environ.get("CPUBN_MPI_REPORT_DIR")
ODD = RANK == 1                 # the process that differs
C = 4


def data(n=6, dtype=np.float32, shape=(3, 2)):
    rng = np.random.default_rng(RANK)
    return rng.standard_normal((n, C) + shape).astype(dtype)


def case_num_features():
    cpubn.SyncBatchNorm(C + 1 if ODD else C)


def case_dtype():
    cpubn.SyncBatchNorm(C, dtype=np.float64 if ODD else np.float32)


def case_axis():
    cpubn.SyncBatchNorm(C, axis=-1 if ODD else 1)


def case_eps_nan():
    cpubn.SyncBatchNorm(C, eps=math.nan if ODD else 1e-5)


def case_input_dtype():
    cpubn.SyncBatchNorm(C)(data(dtype=np.float64 if ODD else np.float32))


def case_input_layout():
    bn = cpubn.SyncBatchNorm(C)
    bn(data(shape=(6,)) if ODD else data())           # (N, C, 6) against (N, C, 3, 2)


def case_shape():
    bn = cpubn.SyncBatchNorm(C)
    bn(data()[:, :C - 1] if ODD else data())


def case_dy_shape():
    bn = cpubn.SyncBatchNorm(C)
    y = bn(data())
    bn.backward(np.ones_like(y)[:-1] if ODD else np.ones_like(y))


def case_one_value():
    bn = cpubn.SyncBatchNorm(C)
    bn(np.ones((1 if RANK == 0 else 0, C), np.float32))


def case_layer_order():
    first, second = cpubn.SyncBatchNorm(C), cpubn.SyncBatchNorm(C)
    (second if ODD else first)(data())


def case_crash():
    if ODD:
        raise KeyError("an error outside cpubn on process 1")
    cpubn.SyncBatchNorm(C)(data())


def report(text):
    """A line of this process's report: printed, and appended to REPORT_DIR/rank<R>.txt
    when that is set (the processes' stdout may interleave)."""
    print(f"rank {RANK}: {text}", flush=True)
    if REPORT_DIR:
        with open(os.path.join(REPORT_DIR, f"rank{RANK}.txt"), "a") as file:
            file.write(text + "\n")


def main():
    case = globals()[f"case_{sys.argv[1]}"]
    try:
        case()
        report("no error")
    except Exception as exc:
        if isinstance(exc, KeyError):
            raise
        report(f"{type(exc).__name__}: {exc}")
    bn = cpubn.SyncBatchNorm(C)
    y = bn(data())
    bn.backward(y)
    report("recovered")


if __name__ == "__main__":
    main()
