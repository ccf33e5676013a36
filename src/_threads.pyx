"""The OpenMP runtime as cpubn sees it (through omp_shim.h, so a serial build works too)."""

cdef extern from "omp_shim.h" nogil:
    int CPUBN_OPENMP_ENABLED
    int omp_get_max_threads()


def openmp_enabled():
    """True when this build of cpubn was compiled with OpenMP (multi-threaded kernels)."""
    return bool(CPUBN_OPENMP_ENABLED)


def omp_max_threads():
    """The OpenMP runtime's current default team size (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()
