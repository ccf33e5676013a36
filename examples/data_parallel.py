"""Data-parallel training with SyncBatchNorm: see cpubn/examples/data_parallel.py.

    mpiexec -n 4 python -m mpi4py examples/data_parallel.py
"""
import sys

from cpubn.examples.data_parallel import main

if __name__ == "__main__":
    sys.exit(main())
