"""A parallel memcpy for ``python -m cpubn bench``'s memory-bandwidth roofline.

It is compiled because the roofline needs a copy that runs on the same OpenMP runtime and
thread count as the kernels it bounds (NumPy's copy is single-threaded).  The library
itself never calls it: it is ``cpubn.bench._copy``, beside the bench that uses it."""
from cython.parallel cimport prange
from libc.string cimport memcpy


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
