"""Backward kernels: per-channel gradient sums and the input gradient, both layouts.

Preconditions, checked by cpubn._validation before any call: dy, x and dx have the same
shape and dtype and are C-contiguous, dx is writeable and overlaps neither dy nor x, mean
and invstd have length C, weight has length C or 0 (gamma = 1), every channel has at least
one element.

With training=True the gradient flows through the batch statistics:
    dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),  xhat = (x - mean) * invstd
and with training=False the statistics are constants: dx = gamma * invstd * dy.
Always: grad_bias = sum(dy), grad_weight = sum(dy * xhat), accumulated in double.
"""
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from bn_loops cimport (floating, rows_grad_sums, rows_input_grad, rows_normalize, run_grad_sums,
                       run_input_grad, run_normalize)
from params cimport gamma_of, param_t
from partition cimport (RUN_CHUNK, block_count, block_rows, chunk_length, chunks_per_run,
                        ordered_sum, rows_per_block)


cdef inline void input_grad_constants(double sum_dy, double sum_dy_xmu, double mean,
                                      double invstd, double gamma, double count, bint training,
                                      floating* k, floating* a, floating* mean_hi,
                                      floating* b) noexcept nogil:
    # dx = dy * k + (x - mean) * a + b0, with the mean split as in the forward
    # (mean_hi in the data type, remainder folded into b) so x - mean_hi stays exact.
    cdef double scale = gamma * invstd
    cdef double slope = -scale * invstd * invstd * sum_dy_xmu / count
    cdef double offset = -scale * sum_dy / count
    if not training:
        slope = 0.0
        offset = 0.0
    k[0] = <floating>scale
    a[0] = <floating>slope
    mean_hi[0] = <floating>mean if training else 0
    b[0] = <floating>(offset - slope * (mean - <double>mean_hi[0])) if training else 0


# ---------------------------------------------------------------- channels-first (N, C, S)

cdef inline void channel_grad_sums_nchw(const floating* dy, const floating* x, Py_ssize_t N,
                                        Py_ssize_t C, Py_ssize_t S, Py_ssize_t c, double mean,
                                        double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    # Sum the partials of channel c in (n, chunk) order, the order the split path uses too.
    cdef double part_dy, part_dy_xmu
    cdef Py_ssize_t n, k, offset
    sum_dy[0] = 0.0
    sum_dy_xmu[0] = 0.0
    for n in range(N):
        for k in range(chunks_per_run(S)):
            offset = (n * C + c) * S + k * RUN_CHUNK
            run_grad_sums(dy + offset, x + offset, chunk_length(S, k), mean,
                          &part_dy, &part_dy_xmu)
            sum_dy[0] += part_dy
            sum_dy_xmu[0] += part_dy_xmu


cdef inline void input_grad_run(const floating* dy, const floating* x, floating* dx,
                                Py_ssize_t S, floating k, floating a, floating mean_hi,
                                floating b, bint training) noexcept nogil:
    if training:
        run_input_grad(dy, x, dx, S, k, a, mean_hi, b)
    else:
        run_normalize(dy, dx, S, 0, k, 0)   # dx = dy * k; x is not read


def backward_nchw(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                  floating[:, :, ::1] dx, const double[::1] mean, const double[::1] invstd,
                  const param_t[::1] weight, bint training, double[::1] grad_weight,
                  double[::1] grad_bias, int n_threads):
    """Backward, channels-first.  With enough channels per thread each thread reduces a
    channel's dy and x slabs and writes its dx while they are in L2 (DRAM: dy and x read
    once, dx written once); otherwise partial sums are computed in parallel, combined in
    a fixed order, and dx is written in a second pass."""
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], S = dy.shape[2]
    cdef Py_ssize_t c, n, u, k, offset
    cdef Py_ssize_t chunks = chunks_per_run(S)
    cdef Py_ssize_t units = N * chunks
    cdef double count = <double>(N * S), sum_dy, sum_dy_xmu
    cdef floating k_c, a_c, mean_hi_c, b_c
    cdef double* partial_dy = NULL
    cdef double* partial_dy_xmu = NULL
    cdef floating* constants = NULL

    if C >= 2 * n_threads:
        with nogil:
            for c in prange(C, schedule='static', num_threads=n_threads,
                            use_threads_if=n_threads > 1):
                sum_dy = 0.0    # assigned here so that prange makes them thread-private
                sum_dy_xmu = 0.0
                channel_grad_sums_nchw(&dy[0, 0, 0], &x[0, 0, 0], N, C, S, c, mean[c],
                                       &sum_dy, &sum_dy_xmu)
                grad_bias[c] = sum_dy
                grad_weight[c] = sum_dy_xmu * invstd[c]
                k_c = 0
                a_c = 0
                mean_hi_c = 0
                b_c = 0
                input_grad_constants(sum_dy, sum_dy_xmu, mean[c], invstd[c],
                                     gamma_of(weight, c), count, training,
                                     &k_c, &a_c, &mean_hi_c, &b_c)
                for n in range(N):
                    input_grad_run(&dy[n, c, 0], &x[n, c, 0], &dx[n, c, 0], S,
                                   k_c, a_c, mean_hi_c, b_c, training)
        return

    partial_dy = <double*>malloc(C * units * sizeof(double))
    partial_dy_xmu = <double*>malloc(C * units * sizeof(double))
    constants = <floating*>malloc(4 * C * sizeof(floating))
    if partial_dy == NULL or partial_dy_xmu == NULL or constants == NULL:
        free(partial_dy); free(partial_dy_xmu); free(constants)
        raise MemoryError("cpubn: could not allocate reduction scratch")
    with nogil:
        # Partial u of channel c covers chunk k of run n: u = c * units + n * chunks + k.
        for u in prange(C * units, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            c = u // units
            n = (u % units) // chunks
            k = u % chunks
            offset = (n * C + c) * S + k * RUN_CHUNK
            run_grad_sums(&dy[0, 0, 0] + offset, &x[0, 0, 0] + offset, chunk_length(S, k),
                          mean[c], &partial_dy[u], &partial_dy_xmu[u])
        for c in range(C):
            sum_dy = ordered_sum(partial_dy + c * units, units, 1)
            sum_dy_xmu = ordered_sum(partial_dy_xmu + c * units, units, 1)
            grad_bias[c] = sum_dy
            grad_weight[c] = sum_dy_xmu * invstd[c]
            input_grad_constants(sum_dy, sum_dy_xmu, mean[c], invstd[c], gamma_of(weight, c),
                                 count, training, &constants[c], &constants[C + c],
                                 &constants[2 * C + c], &constants[3 * C + c])
        for u in prange(N * C, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            c = u % C
            input_grad_run(&dy[0, 0, 0] + u * S, &x[0, 0, 0] + u * S, &dx[0, 0, 0] + u * S, S,
                           constants[c], constants[C + c], constants[2 * C + c],
                           constants[3 * C + c], training)
    free(partial_dy)
    free(partial_dy_xmu)
    free(constants)


# ---------------------------------------------------------------- channels-last (R, C)

def backward_nhwc(const floating[:, ::1] dy, const floating[:, ::1] x, floating[:, ::1] dx,
                  const double[::1] mean, const double[::1] invstd, const param_t[::1] weight,
                  bint training, double[::1] grad_weight, double[::1] grad_bias,
                  int n_threads):
    """Backward, channels-last: per-block sums of all channels (vectorized over C), summed
    per channel in block order, then a pass writing dx.  DRAM: dy and x read twice
    (once in eval mode's second pass), dx written once."""
    cdef Py_ssize_t R = dy.shape[0], C = dy.shape[1]
    cdef Py_ssize_t rows = rows_per_block(C)
    cdef Py_ssize_t blocks = block_count(R, rows)
    cdef Py_ssize_t b, c
    cdef double sum_dy, sum_dy_xmu
    cdef double* partial_dy = <double*>malloc(blocks * C * sizeof(double))
    cdef double* partial_dy_xmu = <double*>malloc(blocks * C * sizeof(double))
    cdef floating* constants = <floating*>malloc(4 * C * sizeof(floating))
    if partial_dy == NULL or partial_dy_xmu == NULL or constants == NULL:
        free(partial_dy); free(partial_dy_xmu); free(constants)
        raise MemoryError("cpubn: could not allocate reduction scratch")
    with nogil:
        for b in prange(blocks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            rows_grad_sums(&dy[0, 0] + b * rows * C, &x[0, 0] + b * rows * C,
                           block_rows(R, rows, b), C, &mean[0],
                           partial_dy + b * C, partial_dy_xmu + b * C)
        for c in prange(C, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and blocks * C > 65536):
            sum_dy = ordered_sum(partial_dy + c, blocks, C)
            sum_dy_xmu = ordered_sum(partial_dy_xmu + c, blocks, C)
            grad_bias[c] = sum_dy
            grad_weight[c] = sum_dy_xmu * invstd[c]
            input_grad_constants(sum_dy, sum_dy_xmu, mean[c], invstd[c], gamma_of(weight, c),
                                 <double>R, training, &constants[c], &constants[C + c],
                                 &constants[2 * C + c], &constants[3 * C + c])
        for b in prange(blocks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            if training:
                rows_input_grad(&dy[0, 0] + b * rows * C, &x[0, 0] + b * rows * C,
                                &dx[0, 0] + b * rows * C, block_rows(R, rows, b), C,
                                constants, constants + C, constants + 2 * C, constants + 3 * C)
            else:
                # dx = (dy - 0) * k + 0: mean_hi and b are zero in eval mode; x is not read.
                rows_normalize(&dy[0, 0] + b * rows * C, &dx[0, 0] + b * rows * C,
                               block_rows(R, rows, b), C, constants + 2 * C, constants,
                               constants + 3 * C)
    free(partial_dy)
    free(partial_dy_xmu)
    free(constants)
