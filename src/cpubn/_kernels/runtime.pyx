"""The OpenMP runtime as cpubn sees it (through omp_shim.h, so a serial build works too)."""

cdef extern from "omp_shim.h" nogil:
    int CPUBN_OPENMP_ENABLED
    int omp_get_max_threads()

cdef extern from "simd_dispatch.h" nogil:
    const char* cpubn_kernel_isa()


def openmp_enabled():
    """True when this build of cpubn was compiled with OpenMP (multi-threaded kernels)."""
    return bool(CPUBN_OPENMP_ENABLED)


def omp_max_threads():
    """The OpenMP runtime's current default team size (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def kernel_isa():
    """The instruction set of the kernel loops this machine runs: "avx512f", "avx2" or
    "default" (baseline x86-64) for a multiversioned build, "native" for one built for a
    single target (simd_dispatch.h)."""
    return cpubn_kernel_isa().decode("ascii")
