"""Forward kernels: batch statistics and normalization, channels-first and channels-last.

Layouts: channels-first data is viewed as (N, C, S) and channels-last data as (R, C), both
C-contiguous.  Preconditions, all checked by cpubn._validation before any call: x and y
have the same shape and dtype and are C-contiguous, y is writeable and either is x or does
not overlap it, per-channel arrays have length C, except weight and bias which may have
length 0 (meaning gamma = 1 and beta = 0), and every channel has at least one element.

Outputs of the statistics are float64: save_mean, save_invstd = 1 / sqrt(var + eps) and
batch_var, the biased variance.  Each kernel releases the GIL for its whole run.
"""
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from bn_loops cimport chan_merge, floating, rows_mean_m2, rows_normalize, run_mean_m2, run_normalize
from params cimport beta_of, gamma_of, param_t
from partition cimport (RUN_CHUNK, block_count, block_rows, chunk_length, chunks_per_run,
                        rows_per_block)


cdef inline void normalize_constants(double mean, double invstd, double gamma, double beta,
                                     floating* mean_hi, floating* scale,
                                     floating* shift) noexcept nogil:
    # y = (x - mean) * s + beta is evaluated as (x - mean_hi) * s + (beta - (mean - mean_hi) * s).
    # mean_hi is the mean rounded to the data type, so x - mean_hi is exact for x near the
    # mean however large the offset; the rounding remainder rides in the shift, computed in
    # double.  A single rounded `x * s + (beta - mean * s)` would lose ~offset * 6e-8 in float32.
    cdef double s = invstd * gamma
    mean_hi[0] = <floating>mean
    scale[0] = <floating>s
    shift[0] = <floating>(beta - (mean - <double>mean_hi[0]) * s)


# ---------------------------------------------------------------- channels-first (N, C, S)

cdef inline void channel_stats_nchw(const floating* x, Py_ssize_t N, Py_ssize_t C,
                                    Py_ssize_t S, Py_ssize_t c, double* mean,
                                    double* m2) noexcept nogil:
    # Merge the partials of channel c (one per run chunk, in (n, chunk) order).  The split
    # path of forward_train_nchw computes the same partials in parallel and merges them in
    # this same order, so both paths give identical bits.
    cdef double count = 0.0, part_mean, part_m2
    cdef Py_ssize_t n, k, length
    mean[0] = 0.0
    m2[0] = 0.0
    for n in range(N):
        for k in range(chunks_per_run(S)):
            length = chunk_length(S, k)
            run_mean_m2(x + (n * C + c) * S + k * RUN_CHUNK, length, &part_mean, &part_m2)
            chan_merge(&count, mean, m2, <double>length, part_mean, part_m2)


cdef inline void normalize_runs_nchw(const floating* x, floating* y, Py_ssize_t N,
                                     Py_ssize_t C, Py_ssize_t S, const floating* mean_hi,
                                     const floating* scale, const floating* shift,
                                     int n_threads) noexcept nogil:
    cdef Py_ssize_t run, c
    for run in prange(N * C, schedule='static', num_threads=n_threads,
                      use_threads_if=n_threads > 1):
        c = run % C
        run_normalize(x + run * S, y + run * S, S, mean_hi[c], scale[c], shift[c])


def forward_train_nchw(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                       const param_t[::1] weight, const param_t[::1] bias, double eps,
                       double[::1] save_mean, double[::1] save_invstd, double[::1] batch_var,
                       int n_threads):
    """Training forward, channels-first: batch statistics, then y = normalized x * gamma + beta.

    With enough channels per thread, each channel's slab is reduced and normalized by one
    thread while it is still in L2, so DRAM sees x read once and y written once.  With few
    channels, the partials are computed in parallel, merged, and y is written in a second
    pass.  Both paths merge the same partials in the same order.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t c, n, u, k, length
    cdef Py_ssize_t chunks = chunks_per_run(S)
    cdef Py_ssize_t units = N * chunks          # partials per channel
    cdef double count, mean, m2, invstd
    cdef floating mean_hi, scale, shift
    cdef double* partial_mean = NULL
    cdef double* partial_m2 = NULL
    cdef floating* constants = NULL
    cdef bint per_channel = C >= 2 * n_threads

    if per_channel:
        with nogil:
            for c in prange(C, schedule='static', num_threads=n_threads,
                            use_threads_if=n_threads > 1):
                mean = 0.0      # assigned here so that prange makes them thread-private
                m2 = 0.0        # (a variable only written through a pointer stays shared)
                channel_stats_nchw(&x[0, 0, 0], N, C, S, c, &mean, &m2)
                invstd = 1.0 / sqrt(m2 / <double>(N * S) + eps)
                save_mean[c] = mean
                save_invstd[c] = invstd
                batch_var[c] = m2 / <double>(N * S)
                mean_hi = 0
                scale = 0
                shift = 0
                normalize_constants(mean, invstd, gamma_of(weight, c), beta_of(bias, c),
                                    &mean_hi, &scale, &shift)
                for n in range(N):
                    run_normalize(&x[n, c, 0], &y[n, c, 0], S, mean_hi, scale, shift)
        return

    partial_mean = <double*>malloc(C * units * sizeof(double))
    partial_m2 = <double*>malloc(C * units * sizeof(double))
    constants = <floating*>malloc(3 * C * sizeof(floating))
    if partial_mean == NULL or partial_m2 == NULL or constants == NULL:
        free(partial_mean); free(partial_m2); free(constants)
        raise MemoryError("cpubn: could not allocate reduction scratch")
    try:
        with nogil:
            # Partial u of channel c covers chunk k of run n: u = c * units + n * chunks + k.
            for u in prange(C * units, schedule='static', num_threads=n_threads,
                            use_threads_if=n_threads > 1):
                c = u // units
                n = (u % units) // chunks
                k = u % chunks
                run_mean_m2(&x[n, c, 0] + k * RUN_CHUNK, chunk_length(S, k),
                            &partial_mean[u], &partial_m2[u])
            for c in range(C):
                count = 0.0
                mean = 0.0
                m2 = 0.0
                for u in range(c * units, (c + 1) * units):
                    length = chunk_length(S, u % chunks)
                    chan_merge(&count, &mean, &m2, <double>length, partial_mean[u],
                               partial_m2[u])
                invstd = 1.0 / sqrt(m2 / <double>(N * S) + eps)
                save_mean[c] = mean
                save_invstd[c] = invstd
                batch_var[c] = m2 / <double>(N * S)
                normalize_constants(mean, invstd, gamma_of(weight, c), beta_of(bias, c),
                                    &constants[c], &constants[C + c], &constants[2 * C + c])
            normalize_runs_nchw(&x[0, 0, 0], &y[0, 0, 0], N, C, S, constants,
                                constants + C, constants + 2 * C, n_threads)
    finally:
        free(partial_mean)
        free(partial_m2)
        free(constants)


def forward_eval_nchw(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                      const param_t[::1] mean, const param_t[::1] var,
                      const param_t[::1] weight, const param_t[::1] bias, double eps,
                      double[::1] save_mean, double[::1] save_invstd, int n_threads):
    """Eval forward, channels-first: normalize with the given (running) statistics.

    One pass: x read once, y written once."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef floating* constants = <floating*>malloc(3 * C * sizeof(floating))
    if constants == NULL:
        raise MemoryError("cpubn: could not allocate channel constants")
    with nogil:
        eval_constants(mean, var, weight, bias, eps, save_mean, save_invstd, constants)
        normalize_runs_nchw(&x[0, 0, 0], &y[0, 0, 0], N, C, S, constants, constants + C,
                            constants + 2 * C, n_threads)
    free(constants)


cdef inline void eval_constants(const param_t[::1] mean, const param_t[::1] var,
                                const param_t[::1] weight, const param_t[::1] bias, double eps,
                                double[::1] save_mean, double[::1] save_invstd,
                                floating* constants) noexcept nogil:
    # constants holds mean_hi[C], scale[C], shift[C] back to back.
    cdef Py_ssize_t c, C = mean.shape[0]
    cdef double invstd
    for c in range(C):
        invstd = 1.0 / sqrt(<double>var[c] + eps)
        save_mean[c] = <double>mean[c]
        save_invstd[c] = invstd
        normalize_constants(<double>mean[c], invstd, gamma_of(weight, c), beta_of(bias, c),
                            &constants[c], &constants[C + c], &constants[2 * C + c])


# ---------------------------------------------------------------- channels-last (R, C)

cdef inline void normalize_blocks_nhwc(const floating* x, floating* y, Py_ssize_t R,
                                       Py_ssize_t C, const floating* mean_hi,
                                       const floating* scale, const floating* shift,
                                       int n_threads) noexcept nogil:
    cdef Py_ssize_t rows = rows_per_block(C), b
    for b in prange(block_count(R, rows), schedule='static', num_threads=n_threads,
                    use_threads_if=n_threads > 1):
        rows_normalize(x + b * rows * C, y + b * rows * C, block_rows(R, rows, b), C,
                       mean_hi, scale, shift)


def forward_train_nhwc(const floating[:, ::1] x, floating[:, ::1] y,
                       const param_t[::1] weight, const param_t[::1] bias, double eps,
                       double[::1] save_mean, double[::1] save_invstd, double[::1] batch_var,
                       int n_threads):
    """Training forward, channels-last: per-block statistics of all channels at once (the
    channel loop is the vector loop), merged per channel in block order, then a
    normalization pass.  DRAM traffic: x read twice, y written once."""
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t rows = rows_per_block(C)
    cdef Py_ssize_t blocks = block_count(R, rows)
    cdef Py_ssize_t b, block, c
    cdef double count, mean, m2, invstd
    cdef double* partial_mean = <double*>malloc(blocks * C * sizeof(double))
    cdef double* partial_m2 = <double*>malloc(blocks * C * sizeof(double))
    cdef floating* constants = <floating*>malloc(3 * C * sizeof(floating))
    if partial_mean == NULL or partial_m2 == NULL or constants == NULL:
        free(partial_mean); free(partial_m2); free(constants)
        raise MemoryError("cpubn: could not allocate reduction scratch")
    with nogil:
        for b in prange(blocks, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            rows_mean_m2(&x[0, 0] + b * rows * C, block_rows(R, rows, b), C,
                         partial_mean + b * C, partial_m2 + b * C)
        for c in prange(C, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1 and blocks * C > 65536):
            count = 0.0
            mean = 0.0
            m2 = 0.0
            for block in range(blocks):
                chan_merge(&count, &mean, &m2, <double>block_rows(R, rows, block),
                           partial_mean[block * C + c], partial_m2[block * C + c])
            invstd = 1.0 / sqrt(m2 / <double>R + eps)
            save_mean[c] = mean
            save_invstd[c] = invstd
            batch_var[c] = m2 / <double>R
            normalize_constants(mean, invstd, gamma_of(weight, c), beta_of(bias, c),
                                &constants[c], &constants[C + c], &constants[2 * C + c])
        normalize_blocks_nhwc(&x[0, 0], &y[0, 0], R, C, constants, constants + C,
                              constants + 2 * C, n_threads)
    free(partial_mean)
    free(partial_m2)
    free(constants)


def forward_eval_nhwc(const floating[:, ::1] x, floating[:, ::1] y,
                      const param_t[::1] mean, const param_t[::1] var,
                      const param_t[::1] weight, const param_t[::1] bias, double eps,
                      double[::1] save_mean, double[::1] save_invstd, int n_threads):
    """Eval forward, channels-last: one pass, per-channel constants vectorized over C."""
    cdef Py_ssize_t R = x.shape[0], C = x.shape[1]
    cdef floating* constants = <floating*>malloc(3 * C * sizeof(floating))
    if constants == NULL:
        raise MemoryError("cpubn: could not allocate channel constants")
    with nogil:
        eval_constants(mean, var, weight, bias, eps, save_mean, save_invstd, constants)
        normalize_blocks_nhwc(&x[0, 0], &y[0, 0], R, C, constants, constants + C,
                              constants + 2 * C, n_threads)
    free(constants)
