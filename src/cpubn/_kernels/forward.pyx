"""Forward kernels: batch statistics and normalization, channels-first and channels-last.

Data is seen as (N, C, S) C-contiguous: channels-first with S = product of the dims after
the feature axis, channels-last when S == 1 (then N is the row count R).  Preconditions,
all checked by cpubn._core.validation / cpubn._core.dispatch before any call: x and y have the same
dtype (float32, float64, float16 or bfloat16) and N*C*S elements, are C-contiguous, y is
writeable and is either x itself or does not overlap it; weight, bias, mean, var are None
or contiguous length-C arrays of one float dtype, float32 for half-precision data; stats
is a contiguous float64 array of 3*C (train) or 2*C (eval) elements; every channel has at
least one element.

Half-precision data (float16, bfloat16) is computed like float32 data, in float with
double accumulation, and each output is rounded once to the data type.

stats receives, back to back: mean, invstd = 1 / sqrt(var + eps) and (train only) the
biased batch variance, all float64.  The kernels release the GIL while they run.

Fused epilogue: with a residual r (None, or an array like x: it may be x itself, both
being only read, but check_forward_arrays refuses one that overlaps y) and/or relu,
y = relu(bn(x) + r) is written in the same pass that writes bn(x) (x, r read once, y
written once): no extra memory and, on large tensors, about the time of bn alone.
"""
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

cimport numpy as cnp

from cpubn._kernels.loops cimport (chan_merge, combine_row_blocks, cpubn_bfloat16, cpubn_half,
                                   cpubn_half_conversions, cpubn_half_init, data_t, floating,
                                   new_work, rows_mean_m2, rows_normalize_act, run_mean_m2,
                                   run_normalize_act, shifted, slab_mean_m2, slab_normalize,
                                   thread_slot, thread_work, touch_lines)
from cpubn._kernels.boundary cimport (DATA_BFLOAT16, DATA_FLOAT16, DATA_FLOAT32, DATA_FLOAT64,
                                      OUT_OF_MEMORY, UNSUPPORTED_TYPES, beta_of, check_dims,
                                      check_no_overlap, check_params, check_status, checked_array,
                                      data_kind, data_of, gamma_of, param_t)
from cpubn._kernels.partition cimport (COMBINE_TILE, MAX_CHANNEL_BLOCK, RUN_CHUNK, block_count,
                                       block_rows, chunk_length, channels_per_block,
                                       chunks_per_run, rows_per_block, SCHEDULE_CHUNK_ELEMS,
                                       schedule_chunk, slab_batch_items, slab_batch_tiles,
                                       slab_channel_tiles, slab_channels, slab_first_channel,
                                       slab_offset, partials_wave, split_item_offset,
                                       split_item_slot, split_wave, touches_row_blocks, uses_slabs)

cnp.import_array()
cpubn_half_init()       # once, here: the loops only read which conversions this CPU has


cdef inline void normalize_constants(double mean, double invstd, double gamma, double beta,
                                     floating* mean_hi, floating* scale,
                                     floating* shift) noexcept nogil:
    # y = (x - mean) * s + beta is evaluated as (x - mean_hi) * s + (beta - (mean - mean_hi) * s).
    # mean_hi is the mean rounded to the compute type, so x - mean_hi is exact for x near the
    # mean however large the offset; the rounding remainder rides in the shift, computed in
    # double.  A single rounded `x * s + (beta - mean * s)` would lose ~offset * 6e-8 in float32.
    cdef double s = invstd * gamma
    mean_hi[0] = <floating>mean
    scale[0] = <floating>s
    shift[0] = <floating>(beta - (mean - <double>mean_hi[0]) * s)


cdef inline void store_channel(double mean, double m2, double count, double eps, Py_ssize_t c,
                               Py_ssize_t C, double* stats) noexcept nogil:
    # The corrected two-pass m2 can round to a hair below zero for (near-)constant data.
    cdef double var = 0.0 if m2 < 0.0 else m2 / count
    stats[c] = mean
    stats[C + c] = 1.0 / sqrt(var + eps)
    stats[2 * C + c] = var


# ---------------------------------------------------------------- channels-first (N, C, S)

cdef void train_channel_block(const data_t* x, const data_t* r, data_t* y,
                              const param_t* weight, const param_t* bias, double eps,
                              double* stats, floating* constants, Py_ssize_t N, Py_ssize_t C,
                              Py_ssize_t S, Py_ssize_t c0, Py_ssize_t c1, bint relu,
                              bint stream, float* work) noexcept nogil:
    # Channels c0 <= c < c1, all batch items: statistics, then normalization while the
    # block's slab is still in L2, so DRAM sees x read once and y written once.  Each
    # channel merges its partials (one per run chunk) in (n, chunk) order, the order the
    # split path of train_nchw uses too: both give identical bits.  (Interleaving the next
    # block's reads with this block's writes was tried: no gain at 1 or 2 threads.)
    # constants: the call's mean_hi[C], scale[C], shift[C]; the block fills its channels.
    # work: this thread's scratch (thread_work).
    cdef double count[MAX_CHANNEL_BLOCK]
    cdef double mean[MAX_CHANNEL_BLOCK]
    cdef double m2[MAX_CHANNEL_BLOCK]
    cdef Py_ssize_t n, j, k, length, width = c1 - c0
    cdef double part_mean, part_m2
    for j in range(width):
        count[j] = 0.0
        mean[j] = 0.0
        m2[j] = 0.0
    for n in range(N):
        for j in range(width):
            for k in range(chunks_per_run(S)):
                length = chunk_length(S, k)
                run_mean_m2(x + (n * C + c0 + j) * S + k * RUN_CHUNK, length,
                            &part_mean, &part_m2, work)
                chan_merge(&count[j], &mean[j], &m2[j], <double>length, part_mean, part_m2)
    for j in range(width):
        store_channel(mean[j], m2[j], count[j], eps, c0 + j, C, stats)
        normalize_constants(mean[j], stats[C + c0 + j], gamma_of(weight, c0 + j),
                            beta_of(bias, c0 + j), &constants[c0 + j],
                            &constants[C + c0 + j], &constants[2 * C + c0 + j])
    for n in range(N):
        for j in range(width):
            run_normalize_act(x + (n * C + c0 + j) * S, shifted(r, (n * C + c0 + j) * S),
                              y + (n * C + c0 + j) * S, S, constants[c0 + j],
                              constants[C + c0 + j], constants[2 * C + c0 + j], relu, stream,
                              work)


cdef inline void normalize_piece(const data_t* x, const data_t* r, data_t* y, Py_ssize_t C,
                                 Py_ssize_t S, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t width,
                                 const floating* constants, bint relu, bint stream,
                                 float* work) noexcept nogil:
    cdef Py_ssize_t offset = (n * C + c0) * S
    slab_normalize(x + offset, shifted(r, offset), y + offset, 1, C, S, min(width, C - c0),
                   &constants[c0], &constants[C + c0], &constants[2 * C + c0], relu, stream,
                   work)


cdef void normalize_pieces_nchw(const data_t* x, const data_t* r, data_t* y, Py_ssize_t N,
                               Py_ssize_t C, Py_ssize_t S, const floating* constants,
                               int n_threads, bint relu, bint stream,
                               float* work) noexcept nogil:
    # Short runs (uses_slabs): one slab_normalize call per piece of about
    # SCHEDULE_CHUNK_ELEMS contiguous values (one batch item's runs of `width` channels),
    # the pieces in memory order.  One call per run cost more than a 7x7 run's arithmetic
    # ((32, 2048, 7, 7) eval: 0.83-0.90x the time this way); walking the statistics' slabs
    # instead (a batch tile's items at a stride of C * S) measured 1.1-1.7x slower.
    cdef Py_ssize_t width = max(1, SCHEDULE_CHUNK_ELEMS // S)
    cdef Py_ssize_t per_item = (C + width - 1) // width, u
    if n_threads == 1:                          # no OpenMP region: partition.pxd, serial calls
        for u in range(N * per_item):
            normalize_piece(x, r, y, C, S, u // per_item, (u % per_item) * width, width,
                            constants, relu, stream, work)
        return
    for u in prange(N * per_item, schedule='dynamic', num_threads=n_threads):
        normalize_piece(x, r, y, C, S, u // per_item, (u % per_item) * width, width,
                        constants, relu, stream, thread_work(work, n_threads))


cdef void normalize_runs_nchw(const data_t* x, const data_t* r, data_t* y, Py_ssize_t N,
                              Py_ssize_t C, Py_ssize_t S, const floating* constants,
                              int n_threads, bint relu, bint stream,
                              float* work) noexcept nogil:
    # constants: mean_hi[C], scale[C], shift[C] back to back; work: the call's scratch
    # (new_work), of which each thread takes its own slice.
    cdef Py_ssize_t run, c
    if uses_slabs(S):
        normalize_pieces_nchw(x, r, y, N, C, S, constants, n_threads, relu, stream, work)
        return
    if n_threads == 1:                          # no OpenMP region: partition.pxd, serial calls
        for run in range(N * C):
            c = run % C
            run_normalize_act(x + run * S, shifted(r, run * S), y + run * S, S,
                              constants[c], constants[C + c], constants[2 * C + c], relu,
                              stream, work)
        return
    for run in prange(N * C, schedule='dynamic', chunksize=schedule_chunk(S),
                      num_threads=n_threads):
        c = run % C
        run_normalize_act(x + run * S, shifted(r, run * S), y + run * S, S, constants[c],
                          constants[C + c], constants[2 * C + c], relu, stream,
                          thread_work(work, n_threads))


cdef int train_nchw(const data_t* x, const data_t* r, data_t* y, const param_t* weight,
                    const param_t* bias, double eps, double* stats, floating* constants,
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int n_threads, bint relu,
                    bint stream, float* work) noexcept nogil:
    # Long runs with enough channel blocks for every thread: one pass per block
    # (train_channel_block).  Otherwise the statistics first, from the slab kernels
    # (short runs: slab_stats_nchw) or the split path (few channels: stats_nchw), then y in
    # a second pass in memory order: x is read twice.  (For short runs, normalizing each
    # slab of whole channels right after its statistics, while it is in L2, reads x once
    # but writes y a few KiB per batch item at a time: measured 1.3-1.7x slower at 2
    # threads on (32, 2048, 7, 7), which fits in the last-level cache anyway.)
    cdef Py_ssize_t per_block = channels_per_block(S)
    cdef Py_ssize_t blocks = (C + per_block - 1) // per_block
    cdef Py_ssize_t b, c
    cdef int status

    if not uses_slabs(S) and blocks >= 2 * n_threads:
        for b in prange(blocks, schedule='dynamic', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            train_channel_block(x, r, y, weight, bias, eps, stats, constants, N, C, S,
                                b * per_block, min(C, (b + 1) * per_block), relu, stream,
                                thread_work(work, n_threads))
        return 0

    if uses_slabs(S):
        status = slab_stats_nchw(x, eps, stats, N, C, S, n_threads, work)
    else:
        status = stats_nchw(x, eps, stats, N, C, S, n_threads, work)
    if status != 0:
        return status
    for c in range(C):
        normalize_constants(stats[c], stats[C + c], gamma_of(weight, c), beta_of(bias, c),
                            &constants[c], &constants[C + c], &constants[2 * C + c])
    normalize_runs_nchw(x, r, y, N, C, S, constants, n_threads, relu, stream, work)
    return 0


# ---------------------------------------------------------------- channels-last (R, C)

cdef void normalize_blocks_nhwc(const data_t* x, const data_t* r, data_t* y, Py_ssize_t R,
                                Py_ssize_t C, const floating* constants, int n_threads,
                                bint relu, bint stream, float* work) noexcept nogil:
    cdef Py_ssize_t rows = rows_per_block(C), b
    if n_threads == 1:                          # no OpenMP region: partition.pxd, serial calls
        for b in range(block_count(R, rows)):
            rows_normalize_act(x + b * rows * C, shifted(r, b * rows * C), y + b * rows * C,
                               block_rows(R, rows, b), C, constants, constants + C,
                               constants + 2 * C, relu, stream, work)
        return
    for b in prange(block_count(R, rows), schedule='dynamic', num_threads=n_threads):
        rows_normalize_act(x + b * rows * C, shifted(r, b * rows * C), y + b * rows * C,
                           block_rows(R, rows, b), C, constants, constants + C,
                           constants + 2 * C, relu, stream, thread_work(work, n_threads))


cdef int train_nhwc(const data_t* x, const data_t* r, data_t* y, const param_t* weight,
                    const param_t* bias, double eps, double* stats, floating* constants,
                    Py_ssize_t R, Py_ssize_t C, int n_threads, bint relu,
                    bint stream, float* work) noexcept nogil:
    # Per-block statistics of all channels at once (stats_nhwc: the channel loop is the
    # vector loop), combined per channel in block order, then a normalization pass.  DRAM
    # traffic: x read twice, y written once.
    cdef Py_ssize_t c
    cdef int status = stats_nhwc(x, eps, stats, R, C, n_threads, work)
    if status != 0:
        return status
    for c in range(C):
        normalize_constants(stats[c], stats[C + c], gamma_of(weight, c), beta_of(bias, c),
                            &constants[c], &constants[C + c], &constants[2 * C + c])
    normalize_blocks_nhwc(x, r, y, R, C, constants, n_threads, relu, stream, work)
    return 0


# ---------------------------------------------------------------- eval (given statistics)

cdef int eval_any(const data_t* x, const data_t* r, data_t* y, const param_t* mean,
                  const param_t* var, const param_t* weight, const param_t* bias, double eps,
                  double* stats, floating* constants, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  int n_threads, bint relu, bint stream, float* work) noexcept nogil:
    # One pass over the data: x read once, y written once.
    cdef Py_ssize_t c
    for c in range(C):
        stats[c] = <double>mean[c]
        stats[C + c] = 1.0 / sqrt(<double>var[c] + eps)
        normalize_constants(stats[c], stats[C + c], gamma_of(weight, c), beta_of(bias, c),
                            &constants[c], &constants[C + c], &constants[2 * C + c])
    if S == 1:
        normalize_blocks_nhwc(x, r, y, N, C, constants, n_threads, relu, stream, work)
    else:
        normalize_runs_nchw(x, r, y, N, C, S, constants, n_threads, relu, stream, work)
    return 0


cdef inline int train_any(const data_t* x, const data_t* r, data_t* y,
                          const param_t* weight, const param_t* bias, double eps,
                          double* stats, floating* constants, Py_ssize_t N, Py_ssize_t C,
                          Py_ssize_t S, int n_threads, bint relu, bint stream,
                          float* work) noexcept nogil:
    if S == 1:
        return train_nhwc(x, r, y, weight, bias, eps, stats, constants, N, C, n_threads,
                          relu, stream, work)
    return train_nchw(x, r, y, weight, bias, eps, stats, constants, N, C, S, n_threads, relu,
                      stream, work)


# ---------------------------------------------------------------- entry points

cdef int check_forward_arrays(object x, object y, object residual, object stats,
                              Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int n_threads,
                              bint training) except -1:
    # The C boundary (boundary.pxd): returns x's data kind after checking every buffer
    # against the (N, C, S) view; y may be x itself; the residual may be x (both are only
    # read) but must not overlap y.
    check_dims(N, C, S, n_threads, training)
    if not isinstance(x, cnp.ndarray):
        raise TypeError(f"cpubn kernel: x must be a numpy array, got {type(x).__name__}")
    cdef int kind = data_kind(<cnp.ndarray>x)
    checked_array(x, "x", N * C * S, kind, False)
    checked_array(y, "y", N * C * S, kind, True)
    if residual is not None:
        checked_array(residual, "residual", N * C * S, kind, False)
    checked_array(stats, "stats", -(3 if training else 2) * C, -1, True)
    check_no_overlap(x, y, "x", "y", True)
    check_no_overlap(residual, y, "residual", "y", False)
    return kind


def forward_train(x, y, weight, bias, double eps, stats, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, int n_threads, bint stream, residual=None, bint relu=False):
    """Training forward: batch statistics into stats (mean, invstd, biased var), then
    y = (x - mean) * invstd * weight + bias, plus residual (None or a dense array like x)
    and then max(., 0) if relu, in the same pass.  S == 1 selects the channels-last
    kernel; stream writes y with non-temporal stores."""
    cdef int kind = check_forward_arrays(x, y, residual, stats, N, C, S, n_threads, True)
    cdef bint param32 = check_params((weight, bias), ("weight", "bias"), C,
                                     kind == DATA_FLOAT16 or kind == DATA_BFLOAT16)
    cdef void* px = data_of(x)
    cdef void* pr = data_of(residual)
    cdef void* py = data_of(y)
    cdef void* pw = data_of(weight)
    cdef void* pb = data_of(bias)
    cdef double* ps = <double*>data_of(stats)
    cdef int status = UNSUPPORTED_TYPES
    # Per-channel constants in the compute type (at most a double each).
    cdef void* pc = malloc(3 * C * sizeof(double))
    # Each thread's scratch (half-precision tiles, the streaming buffer), before any
    # parallel region.
    cdef bint needs_work = (stream or kind == DATA_FLOAT16 or kind == DATA_BFLOAT16
                            or (S > 1 and uses_slabs(S)))
    cdef float* work = new_work(n_threads) if needs_work else NULL
    if pc == NULL or (needs_work and work == NULL):
        free(pc)
        free(work)
        raise MemoryError("cpubn: could not allocate kernel scratch")
    with nogil:
        if kind == DATA_FLOAT32 and param32:
            status = train_any(<float*>px, <float*>pr, <float*>py, <float*>pw, <float*>pb,
                               eps, ps, <float*>pc, N, C, S, n_threads, relu, stream, work)
        elif kind == DATA_FLOAT32:
            status = train_any(<float*>px, <float*>pr, <float*>py, <double*>pw, <double*>pb,
                               eps, ps, <float*>pc, N, C, S, n_threads, relu, stream, work)
        elif kind == DATA_FLOAT64 and param32:
            status = train_any(<double*>px, <double*>pr, <double*>py, <float*>pw, <float*>pb,
                               eps, ps, <double*>pc, N, C, S, n_threads, relu, stream, work)
        elif kind == DATA_FLOAT64:
            status = train_any(<double*>px, <double*>pr, <double*>py, <double*>pw,
                               <double*>pb, eps, ps, <double*>pc, N, C, S, n_threads, relu,
                               stream, work)
        elif kind == DATA_FLOAT16 and param32:
            status = train_any(<cpubn_half*>px, <cpubn_half*>pr, <cpubn_half*>py, <float*>pw,
                               <float*>pb, eps, ps, <float*>pc, N, C, S, n_threads, relu,
                               stream, work)
        elif kind == DATA_BFLOAT16 and param32:
            status = train_any(<cpubn_bfloat16*>px, <cpubn_bfloat16*>pr, <cpubn_bfloat16*>py,
                               <float*>pw, <float*>pb, eps, ps, <float*>pc, N, C, S,
                               n_threads, relu, stream, work)
    free(pc)
    free(work)
    check_status(status)


def forward_eval(x, y, mean, var, weight, bias, double eps, stats, Py_ssize_t N,
                 Py_ssize_t C, Py_ssize_t S, int n_threads, bint stream, residual=None,
                 bint relu=False):
    """Eval forward with given statistics: stats receives mean and invstd (float64), and
    y = (x - mean) * invstd * weight + bias (+ residual, then max(., 0) if relu)."""
    cdef int kind = check_forward_arrays(x, y, residual, stats, N, C, S, n_threads, False)
    if mean is None or var is None:
        raise TypeError("cpubn kernel: forward_eval needs mean and var arrays")
    cdef bint param32 = check_params((mean, var, weight, bias),
                                     ("mean", "var", "weight", "bias"), C,
                                     kind == DATA_FLOAT16 or kind == DATA_BFLOAT16)
    cdef void* px = data_of(x)
    cdef void* pr = data_of(residual)
    cdef void* py = data_of(y)
    cdef void* pm = data_of(mean)
    cdef void* pv = data_of(var)
    cdef void* pw = data_of(weight)
    cdef void* pb = data_of(bias)
    cdef double* ps = <double*>data_of(stats)
    cdef int status = UNSUPPORTED_TYPES
    cdef void* pc = malloc(3 * C * sizeof(double))
    # Each thread's scratch (half-precision tiles, the streaming buffer), before any
    # parallel region.
    cdef bint needs_work = (stream or kind == DATA_FLOAT16 or kind == DATA_BFLOAT16
                            or (S > 1 and uses_slabs(S)))
    cdef float* work = new_work(n_threads) if needs_work else NULL
    if pc == NULL or (needs_work and work == NULL):
        free(pc)
        free(work)
        raise MemoryError("cpubn: could not allocate kernel scratch")
    with nogil:
        if kind == DATA_FLOAT32 and param32:
            status = eval_any(<float*>px, <float*>pr, <float*>py, <float*>pm, <float*>pv,
                              <float*>pw, <float*>pb, eps, ps, <float*>pc, N, C, S,
                              n_threads, relu, stream, work)
        elif kind == DATA_FLOAT32:
            status = eval_any(<float*>px, <float*>pr, <float*>py, <double*>pm, <double*>pv,
                              <double*>pw, <double*>pb, eps, ps, <float*>pc, N, C, S,
                              n_threads, relu, stream, work)
        elif kind == DATA_FLOAT64 and param32:
            status = eval_any(<double*>px, <double*>pr, <double*>py, <float*>pm, <float*>pv,
                              <float*>pw, <float*>pb, eps, ps, <double*>pc, N, C, S,
                              n_threads, relu, stream, work)
        elif kind == DATA_FLOAT64:
            status = eval_any(<double*>px, <double*>pr, <double*>py, <double*>pm,
                              <double*>pv, <double*>pw, <double*>pb, eps, ps, <double*>pc, N,
                              C, S, n_threads, relu, stream, work)
        elif kind == DATA_FLOAT16 and param32:
            status = eval_any(<cpubn_half*>px, <cpubn_half*>pr, <cpubn_half*>py, <float*>pm,
                              <float*>pv, <float*>pw, <float*>pb, eps, ps, <float*>pc, N, C,
                              S, n_threads, relu, stream, work)
        elif kind == DATA_BFLOAT16 and param32:
            status = eval_any(<cpubn_bfloat16*>px, <cpubn_bfloat16*>pr, <cpubn_bfloat16*>py,
                              <float*>pm, <float*>pv, <float*>pw, <float*>pb, eps, ps,
                              <float*>pc, N, C, S, n_threads, relu, stream, work)
    free(pc)
    free(work)
    check_status(status)


def half_conversions():
    """{dtype name: the conversions its kernels use}: "F16C" / "AVX2" (8 values per
    instruction) or "portable" (no such CPU support, or CPUBN_PORTABLE_HALF=1)."""
    return {"float16": cpubn_half_conversions(0).decode(),
            "bfloat16": cpubn_half_conversions(1).decode()}


# ---------------------------------------------------------------- statistics only
# For layers that normalize with something other than the batch statistics they compute
# (BatchRenorm folds r and d into the scale and shift; SyncBatchNorm merges every
# process's statistics first): the statistics alone, then forward_eval with the final
# per-channel constants.  No y is written, so that pair reads x twice and writes y once.
# The partials and their merge order are train_nchw's and train_nhwc's, so the statistics
# are those forward_train computes, bit for bit, whatever the thread count (train_nchw's
# split path is stats_nchw).

cdef inline double* new_merge_scratch(Py_ssize_t wave_doubles, Py_ssize_t C) noexcept nogil:
    # Scratch of the statistics kernels that work in waves: wave_doubles for a wave's
    # partials, then the running count[C], mean[C] and m2[C] the waves are merged into
    # (zeroed).  NULL if out of memory; the caller frees it.
    cdef double* scratch = <double*>malloc((wave_doubles + 3 * C) * sizeof(double))
    cdef Py_ssize_t k
    if scratch != NULL:
        for k in range(wave_doubles, wave_doubles + 3 * C):
            scratch[k] = 0.0
    return scratch


cdef int stats_nchw(const data_t* x, double eps, double* stats, Py_ssize_t N, Py_ssize_t C,
                    Py_ssize_t S, int n_threads, float* work) noexcept nogil:
    # The split path (few channels): one partial per run chunk, computed in memory order in
    # parallel, merged per channel in (n, chunk) order.  A wave of batch items at a time
    # (partition.pxd: split_wave), each wave's partials folded into the running per-channel
    # (count, mean, m2) before the next: the same ordered merge, so the same bits, with
    # scratch of at most SPLIT_WAVE_ITEMS items (or one batch item's) whatever N.
    cdef Py_ssize_t chunks = chunks_per_run(S)
    cdef Py_ssize_t wave = min(N, split_wave(C, chunks))    # batch items per wave
    cdef Py_ssize_t n0, nw, units, c, u, slot
    cdef double* partials = new_merge_scratch(2 * C * wave * chunks, C)
    cdef double* count
    cdef double* mean
    cdef double* m2
    if partials == NULL:
        return OUT_OF_MEMORY
    count = partials + 2 * C * wave * chunks
    mean = count + C
    m2 = mean + C
    n0 = 0
    while n0 < N:
        nw = min(wave, N - n0)
        units = nw * chunks                     # this wave's partials per channel
        # Item u of the wave: its mean at partials[slot], its m2 at
        # partials[C * units + slot] (partition.pxd: split_item_*).
        for u in prange(nw * C * chunks, schedule='dynamic',
                        chunksize=schedule_chunk(min(S, RUN_CHUNK)), num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            slot = split_item_slot(u, nw, C, chunks)
            run_mean_m2(x + split_item_offset(n0 * C * chunks + u, S, chunks),
                        chunk_length(S, u % chunks), &partials[slot],
                        &partials[C * units + slot], thread_work(work, n_threads))
        for c in range(C):
            for u in range(c * units, (c + 1) * units):
                chan_merge(&count[c], &mean[c], &m2[c], <double>chunk_length(S, u % chunks),
                           partials[u], partials[C * units + u])
        n0 += nw
    for c in range(C):
        store_channel(mean[c], m2[c], count[c], eps, c, C, stats)
    free(partials)
    return 0


cdef int slab_stats_nchw(const data_t* x, double eps, double* stats, Py_ssize_t N,
                         Py_ssize_t C, Py_ssize_t S, int n_threads, float* work) noexcept nogil:
    # Short runs: per-slab statistics (slab_mean_m2).  Slabs of whole channels are final
    # (train_slab computes the same ones); otherwise each wave of batch tiles' partials is
    # merged per channel, in batch order, into running (count, mean, m2) before the next:
    # scratch of 2 * C doubles per batch tile of a wave (partials_wave), whatever N.
    cdef Py_ssize_t tiles = slab_channel_tiles(C, S), batch_tiles = slab_batch_tiles(N, C, S)
    cdef Py_ssize_t wave = min(batch_tiles, partials_wave(C))
    cdef Py_ssize_t u, c, b, b0, nb, c0
    cdef double* partials
    cdef double* count
    cdef double* mean
    cdef double* m2
    if batch_tiles == 1:
        # The mean lands in stats[c], m2 in stats[2 * C + c] until store_channel.
        if n_threads == 1:                      # no OpenMP region: partition.pxd, serial calls
            for u in range(tiles):
                c0 = slab_first_channel(u, C, S)
                slab_mean_m2(x + c0 * S, N, C, S, slab_channels(u, C, S), stats + c0,
                             stats + 2 * C + c0, work)
        else:
            for u in prange(tiles, schedule='dynamic', num_threads=n_threads):
                c0 = slab_first_channel(u, C, S)
                slab_mean_m2(x + c0 * S, N, C, S, slab_channels(u, C, S), stats + c0,
                             stats + 2 * C + c0, thread_work(work, n_threads))
        for c in range(C):
            store_channel(stats[c], stats[2 * C + c], <double>(N * S), eps, c, C, stats)
        return 0
    partials = new_merge_scratch(2 * C * wave, C)
    if partials == NULL:
        return OUT_OF_MEMORY
    count = partials + 2 * C * wave
    mean = count + C
    m2 = mean + C
    b0 = 0
    while b0 < batch_tiles:
        nb = min(wave, batch_tiles - b0)
        # Slab (b0 + b, t) of the wave: its means at partials[b * C + c0:], its m2 at
        # partials[(wave + b) * C + c0:].
        for u in prange(nb * tiles, schedule='dynamic', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            c0 = slab_first_channel(u, C, S)
            slab_mean_m2(x + slab_offset(b0 * tiles + u, N, C, S),
                         slab_batch_items(b0 * tiles + u, N, C, S), C, S,
                         slab_channels(u, C, S), partials + (u // tiles) * C + c0,
                         partials + (wave + u // tiles) * C + c0, thread_work(work, n_threads))
        for c in range(C):
            for b in range(nb):
                chan_merge(&count[c], &mean[c], &m2[c],
                           <double>(slab_batch_items((b0 + b) * tiles, N, C, S) * S),
                           partials[b * C + c], partials[(wave + b) * C + c])
        b0 += nb
    for c in range(C):
        store_channel(mean[c], m2[c], count[c], eps, c, C, stats)
    free(partials)
    return 0


cdef inline void block_mean_m2(const data_t* x, Py_ssize_t R, Py_ssize_t C, Py_ssize_t rows,
                               Py_ssize_t b, bint touch, double* mean, double* m2,
                               double* scratch, float* work) noexcept nogil:
    # Row block b's per-channel mean and m2; scratch: 2 * C doubles of this thread's.
    cdef const data_t* block = x + b * rows * C
    if touch:
        touch_lines(block, block_rows(R, rows, b) * C * sizeof(data_t))
    rows_mean_m2(block, block_rows(R, rows, b), C, mean, m2, scratch, work)


cdef int stats_nhwc(const data_t* x, double eps, double* stats, Py_ssize_t R, Py_ssize_t C,
                    int n_threads, float* work) noexcept nogil:
    # Blocks of rows_per_block(C) rows, a wave of partials_wave(C) blocks at a time: the
    # wave's block partials (in parallel), combined per channel in block order into the
    # wave's mean and m2 (combine_row_blocks), which are merged into the running statistics
    # in wave order (chan_merge).  Wave boundaries depend on R and C alone, so the bits do
    # not depend on the thread count; the scratch is bounded whatever R.  One wave (up to
    # 2^34 / C elements) gives the running statistics the combine's values exactly.
    cdef Py_ssize_t rows = rows_per_block(C)
    cdef Py_ssize_t blocks = block_count(R, rows)
    cdef Py_ssize_t wave = min(blocks, partials_wave(C))
    cdef Py_ssize_t tiles = (C + COMBINE_TILE - 1) // COMBINE_TILE
    cdef Py_ssize_t b, b0, nb, t, c, wave_rows
    cdef double merged
    # Block b of a wave: its means at partials[b * C:], its m2 at partials[(wave + b) * C:];
    # then each thread's rows_mean_m2 scratch (2 * C), the wave's combined mean, m2 and
    # deviations, and the running mean and m2.
    cdef double* partials = <double*>malloc((2 * wave + 2 * n_threads + 5) * C * sizeof(double))
    cdef double* thread_scratch
    cdef double* combined
    cdef double* mean
    cdef double* m2
    # Blocks whose rows the channel tiles walk badly from memory are read linearly first.
    cdef bint touch = touches_row_blocks(C, sizeof(data_t))
    if partials == NULL:
        return OUT_OF_MEMORY
    thread_scratch = partials + 2 * wave * C
    combined = thread_scratch + 2 * n_threads * C
    mean = combined + 3 * C
    m2 = mean + C
    b0 = 0
    while b0 < blocks:
        nb = min(wave, blocks - b0)
        wave_rows = min(R - b0 * rows, nb * rows)
        if n_threads == 1:                      # no OpenMP region: partition.pxd, serial calls
            for b in range(nb):
                block_mean_m2(x, R, C, rows, b0 + b, touch, partials + b * C,
                              partials + (wave + b) * C, thread_scratch, work)
        else:
            for b in prange(nb, schedule='dynamic', num_threads=n_threads):
                block_mean_m2(x, R, C, rows, b0 + b, touch, partials + b * C,
                              partials + (wave + b) * C,
                              thread_scratch + 2 * C * thread_slot(n_threads),
                              thread_work(work, n_threads))
        if n_threads == 1 or nb * C <= 65536:   # a small combine: serial, no OpenMP region
            combine_row_blocks(partials, partials + wave * C, nb, C, rows, wave_rows, 0, C,
                               combined, combined + C, combined + 2 * C)
        else:
            for t in prange(tiles, schedule='dynamic', num_threads=n_threads):
                combine_row_blocks(partials, partials + wave * C, nb, C, rows, wave_rows,
                                   t * COMBINE_TILE, min(C, (t + 1) * COMBINE_TILE),
                                   combined, combined + C, combined + 2 * C)
        if b0 == 0:                             # the first wave: its statistics as they are
            for c in range(C):
                mean[c] = combined[c]
                m2[c] = combined[C + c]
        else:
            for c in range(C):
                merged = <double>(b0 * rows)    # rows already in the running statistics
                chan_merge(&merged, &mean[c], &m2[c], <double>wave_rows, combined[c],
                           combined[C + c])
        b0 += nb
    for c in range(C):
        store_channel(mean[c], m2[c], <double>R, eps, c, C, stats)
    free(partials)
    return 0


cdef inline int stats_any(const data_t* x, double eps, double* stats, Py_ssize_t N,
                          Py_ssize_t C, Py_ssize_t S, int n_threads,
                          float* work) noexcept nogil:
    if S == 1:
        return stats_nhwc(x, eps, stats, N, C, n_threads, work)
    if uses_slabs(S):
        return slab_stats_nchw(x, eps, stats, N, C, S, n_threads, work)
    return stats_nchw(x, eps, stats, N, C, S, n_threads, work)


def batch_stats(x, double eps, stats, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                int n_threads):
    """The statistics forward_train would compute (mean, invstd, biased var, float64, into
    stats), bit for bit, without normalizing: x is only read.  S == 1 selects the
    channels-last kernel."""
    check_dims(N, C, S, n_threads, True)
    if not isinstance(x, cnp.ndarray):
        raise TypeError(f"cpubn kernel: x must be a numpy array, got {type(x).__name__}")
    cdef int kind = data_kind(<cnp.ndarray>x)
    checked_array(x, "x", N * C * S, kind, False)
    checked_array(stats, "stats", -3 * C, -1, True)
    cdef void* px = data_of(x)
    cdef double* ps = <double*>data_of(stats)
    cdef int status = UNSUPPORTED_TYPES
    # Half-precision tiles: each thread's scratch, allocated before the parallel regions.
    cdef bint needs_work = (kind == DATA_FLOAT16 or kind == DATA_BFLOAT16
                            or (S > 1 and uses_slabs(S)))
    cdef float* work = new_work(n_threads) if needs_work else NULL
    if needs_work and work == NULL:
        raise MemoryError("cpubn: could not allocate kernel scratch")
    with nogil:
        if kind == DATA_FLOAT32:
            status = stats_any(<float*>px, eps, ps, N, C, S, n_threads, work)
        elif kind == DATA_FLOAT64:
            status = stats_any(<double*>px, eps, ps, N, C, S, n_threads, work)
        elif kind == DATA_FLOAT16:
            status = stats_any(<cpubn_half*>px, eps, ps, N, C, S, n_threads, work)
        elif kind == DATA_BFLOAT16:
            status = stats_any(<cpubn_bfloat16*>px, eps, ps, N, C, S, n_threads, work)
    free(work)
    check_status(status)


# ---------------------------------------------------------------- running statistics

cdef inline void blend_running(param_t* running, const double* batch, Py_ssize_t C,
                               double factor, double batch_scale) noexcept nogil:
    # running = (1 - factor) * running + factor * (batch * batch_scale), in float64,
    # rounded once to param_t: the operations of the NumPy expression it replaces.
    cdef Py_ssize_t c
    cdef double keep = 1.0 - factor
    for c in range(C):
        running[c] = <param_t>(keep * <double>running[c] + factor * (batch[c] * batch_scale))


def update_running_stats(running_mean, running_var, mean, batch_var, Py_ssize_t C,
                         double count, double factor):
    """Fold a training forward's statistics (mean and biased variance: float64, C values
    each) into the running statistics, in place: running = (1 - factor) * running +
    factor * batch, with the unbiased variance (batch_var * count / (count - 1)) for
    running_var, as in PyTorch.  running_mean, running_var: None or contiguous float32 or
    float64 arrays of C values, of one dtype, writeable, not overlapping the batch's.  A
    call costs well under a microsecond, where the same update in NumPy costs about seven
    at C = 16."""
    if C < 1 or count < 2:
        raise ValueError(f"cpubn kernel: impossible update (C={C}, count={count})")
    checked_array(mean, "mean", C, -1, False)
    checked_array(batch_var, "batch_var", C, -1, False)
    cdef bint param32 = check_params((running_mean, running_var),
                                     ("running_mean", "running_var"), C, False)
    for array, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if array is not None:
            if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>array):
                raise ValueError(f"cpubn kernel: {name} must be writeable")
            check_no_overlap(array, mean, name, "mean", False)
            check_no_overlap(array, batch_var, name, "batch_var", False)
    cdef void* pm = data_of(running_mean)
    cdef void* pv = data_of(running_var)
    cdef const double* batch_mean = <double*>data_of(mean)
    cdef const double* biased_var = <double*>data_of(batch_var)
    cdef double unbias = count / (count - 1.0)
    if pm != NULL:
        if param32:
            blend_running(<float*>pm, batch_mean, C, factor, 1.0)
        else:
            blend_running(<double*>pm, batch_mean, C, factor, 1.0)
    if pv != NULL:
        if param32:
            blend_running(<float*>pv, biased_var, C, factor, unbias)
        else:
            blend_running(<double*>pv, biased_var, C, factor, unbias)
