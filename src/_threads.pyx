"""The OpenMP runtime as cpubn sees it (through omp_shim.h, so a serial build works too),
and a parallel copy used to measure the memory-bandwidth roofline."""
from cython.parallel cimport prange
from libc.string cimport memcpy

cdef extern from "omp_shim.h" nogil:
    int CPUBN_OPENMP_ENABLED
    int omp_get_max_threads()
    int omp_get_num_procs()


def openmp_enabled():
    """True when this build of cpubn was compiled with OpenMP (multi-threaded kernels)."""
    return bool(CPUBN_OPENMP_ENABLED)


def omp_max_threads():
    """The OpenMP runtime's current default team size (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def omp_num_procs():
    return omp_get_num_procs()


def copy_parallel(const unsigned char[::1] src, unsigned char[::1] dst, int n_threads):
    """dst[:] = src, split into one contiguous piece per thread (for bandwidth measurements).

    Both are byte views of equal length (callers pass arr.view(np.uint8))."""
    cdef Py_ssize_t size = src.shape[0], piece, t, start, stop
    if dst.shape[0] != size:
        raise ValueError(f"copy_parallel: sizes differ ({size} and {dst.shape[0]})")
    if size == 0:
        return
    n_threads = max(1, n_threads)
    piece = (size + n_threads - 1) // n_threads
    with nogil:
        for t in prange(n_threads, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            start = t * piece
            stop = min(size, start + piece)
            if start < stop:
                memcpy(&dst[start], &src[start], stop - start)
