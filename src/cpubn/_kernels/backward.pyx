"""Backward kernels: per-channel gradient sums and the input gradient, both layouts.

Data is seen as (N, C, S) C-contiguous (S == 1: channels-last rows).  Preconditions,
checked by cpubn._core.validation / cpubn._core.dispatch before any call: dy, x and dx have the same
dtype (float32, float64, float16 or bfloat16) and N*C*S elements and are C-contiguous; dx
is writeable and is dy itself or overlaps neither dy nor x; stats is a contiguous float64
array holding mean[C] then invstd[C]; weight is None or a contiguous length-C float array
(float32 for half-precision data); grads is a contiguous float64 array of 2*C elements;
every channel has at least one element.  Half-precision data is computed like float32
data (float arithmetic, sums of groups of float values accumulated in double: the same
bits), and dx is rounded once to the data type.

With training=True the gradient flows through the batch statistics:
    dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),  xhat = (x - mean) * invstd
and with training=False the statistics are constants: dx = gamma * invstd * dy.
Always: grads = [grad_weight = sum(dy * xhat), grad_bias = sum(dy)], accumulated in double.

Fused epilogue (the forward added a residual and/or applied a ReLU): the gradient that
reaches the normalization is g = (y <= 0 ? 0 : dy) with y the forward's output (ReLU), or
g = dy (residual add only).  The first pass computes g, stores it in the g buffer (the
residual's gradient, or else dx itself) and accumulates the sums of g instead of dy; the
second pass is the usual input gradient with dy := g, read back while it is still in
cache on the channel-block path.  DRAM: dy, y and x read once, dx (and the residual's
gradient) written once; dx is then written with ordinary stores, over the lines of g.
"""
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

cimport numpy as cnp

from cpubn._kernels.loops cimport (cpubn_bfloat16, cpubn_half, cpubn_half_init, data_t, floating,
                                   new_work, rows_grad_sums, rows_input_grad,
                                   rows_masked_grad_sums, rows_normalize, run_grad_sums,
                                   run_input_grad, run_masked_grad_sums, run_normalize, shifted,
                                   slab_grad_sums, slab_input_grad, thread_slot, thread_work,
                                   touch_lines)
from cpubn._kernels.boundary cimport (DATA_BFLOAT16, DATA_FLOAT16, DATA_FLOAT32, DATA_FLOAT64,
                                      OUT_OF_MEMORY, UNSUPPORTED_TYPES, check_dims,
                                      check_no_overlap, check_params, check_status, checked_array,
                                      data_kind, data_of, gamma_of, param_t)
from cpubn._kernels.partition cimport (COMBINE_TILE, MAX_CHANNEL_BLOCK, RUN_CHUNK, SLAB_MAX_WIDTH,
                                       block_count, block_rows, chunk_length, channels_per_block,
                                       chunks_per_run, rows_per_block, schedule_chunk,
                                       slab_batch_items, slab_batch_tiles, slab_channel_tiles,
                                       slab_channels, slab_first_channel, slab_offset,
                                       partials_wave, slabs_complete, split_item_channel,
                                       split_item_offset, split_item_slot, split_wave,
                                       touches_row_blocks, uses_slabs)

cnp.import_array()
cpubn_half_init()       # once, here: the loops only read which conversions this CPU has


cdef inline void input_grad_constants(double sum_dy, double sum_dy_xmu, double mean,
                                      double invstd, double gamma, double count, bint training,
                                      floating* k, floating* a, floating* mean_hi,
                                      floating* b) noexcept nogil:
    # dx = dy * k + (x - mean) * a + b0, with the mean split as in the forward
    # (mean_hi in the compute type, remainder folded into b) so x - mean_hi stays exact.
    # Eval mode: k only (a = b = mean_hi = 0).
    cdef double scale = gamma * invstd
    cdef double slope = -scale * invstd * invstd * sum_dy_xmu / count
    cdef double offset = -scale * sum_dy / count
    k[0] = <floating>scale
    if training:
        a[0] = <floating>slope
        mean_hi[0] = <floating>mean
        b[0] = <floating>(offset - slope * (mean - <double>mean_hi[0]))
    else:
        a[0] = 0
        mean_hi[0] = 0
        b[0] = 0


cdef inline void store_grads(double sum_dy, double sum_dy_xmu, double invstd, Py_ssize_t c,
                             Py_ssize_t C, double* grads) noexcept nogil:
    grads[c] = sum_dy_xmu * invstd
    grads[C + c] = sum_dy


cdef inline void finish_channel(double sum_dy, double sum_dy_xmu, const double* stats,
                                const param_t* weight, double count, bint training,
                                Py_ssize_t c, Py_ssize_t C, double* grads,
                                floating* constants) noexcept nogil:
    # Channel c's summed gradients: its grads, and its input-gradient constants (k[C],
    # a[C], mean_hi[C], b[C] back to back in constants).
    store_grads(sum_dy, sum_dy_xmu, stats[C + c], c, C, grads)
    input_grad_constants(sum_dy, sum_dy_xmu, stats[c], stats[C + c], gamma_of(weight, c),
                         count, training, &constants[c], &constants[C + c],
                         &constants[2 * C + c], &constants[3 * C + c])


cdef inline void chunk_grad_sums(const data_t* dy, const data_t* y, const data_t* x,
                                 data_t* g, Py_ssize_t offset, Py_ssize_t n, double mean,
                                 double* sum_dy, double* sum_dy_xmu,
                                 float* work) noexcept nogil:
    # The sums of the gradient reaching the normalization over x[offset:offset + n]: dy's
    # (g == NULL), or those of the fused epilogue's g, which is stored into g as well.
    # work: this thread's scratch (thread_work).
    if g == NULL:
        run_grad_sums(dy + offset, x + offset, n, mean, sum_dy, sum_dy_xmu, work)
    else:
        run_masked_grad_sums(dy + offset, shifted(y, offset), x + offset, g + offset, n, mean,
                             sum_dy, sum_dy_xmu, work)


cdef inline void block_grad_sums(const data_t* dy, const data_t* y, const data_t* x,
                                 data_t* g, Py_ssize_t offset, Py_ssize_t rows, Py_ssize_t C,
                                 const double* mean, double* sum_dy,
                                 double* sum_dy_xmu, bint touch, double* scratch,
                                 float* work) noexcept nogil:
    # chunk_grad_sums for a block of channels-last rows starting at element offset.  With
    # touch, dy and x are first read linearly (partition.pxd: touches_row_blocks).
    # scratch: 2 * C doubles of this thread's.
    if touch:
        touch_lines(dy + offset, rows * C * sizeof(data_t))
        touch_lines(x + offset, rows * C * sizeof(data_t))
    if g == NULL:
        rows_grad_sums(dy + offset, x + offset, rows, C, mean, sum_dy, sum_dy_xmu, scratch,
                       work)
    else:
        rows_masked_grad_sums(dy + offset, shifted(y, offset), x + offset, g + offset, rows, C,
                              mean, sum_dy, sum_dy_xmu, scratch, work)


# ---------------------------------------------------------------- channels-first (N, C, S)

cdef inline void input_grad_run(const data_t* dy, const data_t* x, data_t* dx,
                                Py_ssize_t S, floating k, floating a, floating mean_hi,
                                floating b, bint training, bint stream,
                                float* work) noexcept nogil:
    if training:
        run_input_grad(dy, x, dx, S, k, a, mean_hi, b, stream, work)
    else:
        run_normalize(dy, dx, S, 0, k, 0, stream, work)   # dx = dy * k; x is not read


cdef void backward_channel_block(const data_t* dy, const data_t* y, const data_t* x,
                                 data_t* g, data_t* dx, const double* stats,
                                 const param_t* weight, bint training, double* grads,
                                 floating* constants, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                 Py_ssize_t c0, Py_ssize_t c1, bint stream,
                                 float* work) noexcept nogil:
    # Channels c0 <= c < c1, all batch items: the gradient sums, then dx while the
    # block's dy (or g) and x slabs are still in L2 (DRAM: dy and x read once, dx written
    # once).  Each channel adds its partials in (n, chunk) order, as the split path does.
    # constants: the call's k[C], a[C], mean_hi[C], b[C]; the block fills its channels.
    # work: this thread's scratch (thread_work).
    cdef double sum_dy[MAX_CHANNEL_BLOCK]
    cdef double sum_dy_xmu[MAX_CHANNEL_BLOCK]
    cdef Py_ssize_t n, j, k, c, offset, width = c1 - c0
    cdef double part_dy, part_dy_xmu
    cdef const data_t* grad = dy if g == NULL else g    # what the dx pass differentiates
    for j in range(width):
        sum_dy[j] = 0.0
        sum_dy_xmu[j] = 0.0
    for n in range(N):
        for j in range(width):
            for k in range(chunks_per_run(S)):
                offset = (n * C + c0 + j) * S + k * RUN_CHUNK
                chunk_grad_sums(dy, y, x, g, offset, chunk_length(S, k), stats[c0 + j],
                                &part_dy, &part_dy_xmu, work)
                sum_dy[j] += part_dy
                sum_dy_xmu[j] += part_dy_xmu
    for j in range(width):
        c = c0 + j
        finish_channel(sum_dy[j], sum_dy_xmu[j], stats, weight, <double>(N * S), training,
                       c, C, grads, constants)
    for n in range(N):
        for c in range(c0, c1):
            offset = (n * C + c) * S
            input_grad_run(grad + offset, x + offset, dx + offset, S, constants[c],
                           constants[C + c], constants[2 * C + c], constants[3 * C + c],
                           training, stream, work)


cdef int backward_nchw(const data_t* dy, const data_t* y, const data_t* x, data_t* g,
                       data_t* dx, const double* stats, const param_t* weight,
                       bint training, double* grads, floating* constants, Py_ssize_t N,
                       Py_ssize_t C, Py_ssize_t S, int n_threads, bint stream,
                       float* work) noexcept nogil:
    # Enough channel blocks for every thread: one pass per block (backward_channel_block).
    # Otherwise partial sums are computed in parallel in memory order, added per channel
    # in a fixed order, and dx is written in a second pass.
    cdef Py_ssize_t per_block = channels_per_block(S)
    cdef Py_ssize_t blocks = (C + per_block - 1) // per_block
    cdef Py_ssize_t b, c, u, slot, n0, nw, units
    cdef Py_ssize_t chunks = chunks_per_run(S)
    cdef Py_ssize_t wave = min(N, split_wave(C, chunks))    # batch items per wave
    cdef double sum_dy, sum_dy_xmu
    cdef double* partials
    cdef double* sums
    cdef const data_t* grad = dy if g == NULL else g

    if blocks >= 2 * n_threads:
        for b in prange(blocks, schedule='dynamic', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            backward_channel_block(dy, y, x, g, dx, stats, weight, training, grads,
                                   constants, N, C, S, b * per_block,
                                   min(C, (b + 1) * per_block), stream,
                                   thread_work(work, n_threads))
        return 0

    # A wave of batch items at a time (partition.pxd: split_wave), each wave's partials
    # added into the running per-channel sums, partial after partial in (n, chunk) order,
    # before the next: the same ordered sums, so the same bits, with scratch of at most
    # SPLIT_WAVE_ITEMS items (or one batch item's) whatever N.
    partials = <double*>malloc((2 * C * wave * chunks + 2 * C) * sizeof(double))
    if partials == NULL:
        return OUT_OF_MEMORY
    sums = partials + 2 * C * wave * chunks     # sum(dy)[C], then sum(dy * (x - mean))[C]
    for c in range(2 * C):
        sums[c] = 0.0
    n0 = 0
    while n0 < N:
        nw = min(wave, N - n0)
        units = nw * chunks                     # this wave's partials per channel
        # Item u of the wave (partition.pxd: split_item_*): its sum(dy) at partials[slot],
        # its sum(dy * (x - mean)) at partials[C * units + slot].
        for u in prange(nw * C * chunks, schedule='dynamic',
                        chunksize=schedule_chunk(min(S, RUN_CHUNK)), num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            slot = split_item_slot(u, nw, C, chunks)
            chunk_grad_sums(dy, y, x, g, split_item_offset(n0 * C * chunks + u, S, chunks),
                            chunk_length(S, u % chunks), stats[split_item_channel(u, C, chunks)],
                            &partials[slot], &partials[C * units + slot],
                            thread_work(work, n_threads))
        for c in range(C):
            for u in range(c * units, (c + 1) * units):
                sums[c] += partials[u]
                sums[C + c] += partials[C * units + u]
        n0 += nw
    for c in range(C):
        sum_dy = sums[c]
        sum_dy_xmu = sums[C + c]
        finish_channel(sum_dy, sum_dy_xmu, stats, weight, <double>(N * S), training, c, C,
                       grads, constants)
    for u in prange(N * C, schedule='dynamic', chunksize=schedule_chunk(S),
                    num_threads=n_threads, use_threads_if=n_threads > 1):
        c = u % C
        input_grad_run(grad + u * S, x + u * S, dx + u * S, S, constants[c], constants[C + c],
                       constants[2 * C + c], constants[3 * C + c], training, stream,
                       thread_work(work, n_threads))
    free(partials)
    return 0


# ---------------------------------------------------------------- channels-first short runs

cdef inline data_t* shifted_out(data_t* p, Py_ssize_t offset) noexcept nogil:
    # p + offset for an optional output (NULL stays NULL).
    if p == NULL:
        return NULL
    return p + offset


cdef void backward_slab(const data_t* dy, const data_t* y, const data_t* x, data_t* g,
                        data_t* dx, const double* stats, const param_t* weight,
                        bint training, double* grads, floating* constants, Py_ssize_t N,
                        Py_ssize_t C, Py_ssize_t S, Py_ssize_t item,
                        float* work) noexcept nogil:
    # A slab of whole channels (slabs_complete): its gradient sums, then its dx while dy
    # (or g) and x are still in L2.  constants: the call's k[C], a[C], mean_hi[C], b[C].
    cdef double sum_dy[SLAB_MAX_WIDTH]
    cdef double sum_dy_xmu[SLAB_MAX_WIDTH]
    cdef Py_ssize_t c0 = slab_first_channel(item, C, S), width = slab_channels(item, C, S)
    cdef Py_ssize_t j, c, offset = c0 * S
    cdef const data_t* grad = dy if g == NULL else g
    slab_grad_sums(dy + offset, shifted(y, offset), x + offset, shifted_out(g, offset), N, C,
                   S, width, stats + c0, sum_dy, sum_dy_xmu, work)
    for j in range(width):
        c = c0 + j
        finish_channel(sum_dy[j], sum_dy_xmu[j], stats, weight, <double>(N * S), training,
                       c, C, grads, constants)
    slab_input_grad(grad + offset, x + offset, dx + offset, N, C, S, width, &constants[c0],
                    &constants[C + c0], &constants[2 * C + c0], &constants[3 * C + c0],
                    training, work)


cdef int backward_slabs_nchw(const data_t* dy, const data_t* y, const data_t* x, data_t* g,
                             data_t* dx, const double* stats, const param_t* weight,
                             bint training, double* grads, floating* constants, Py_ssize_t N,
                             Py_ssize_t C, Py_ssize_t S, int n_threads,
                             float* work) noexcept nogil:
    # Slabs of whole channels: one pass each (backward_slab).  Larger batches: per-slab
    # sums, a wave of batch tiles at a time (partials_wave), added per channel in batch order;
    # then a dx pass over the slabs.
    cdef Py_ssize_t tiles = slab_channel_tiles(C, S), batch_tiles = slab_batch_tiles(N, C, S)
    cdef Py_ssize_t wave = min(batch_tiles, partials_wave(C))
    cdef Py_ssize_t u, t, c, b, b0, nb, c0, offset
    cdef double* partials
    cdef double* sums
    cdef const data_t* grad = dy if g == NULL else g
    if slabs_complete(N, C, S):
        if n_threads == 1:                      # no OpenMP region: partition.pxd, serial calls
            for t in range(tiles):
                backward_slab(dy, y, x, g, dx, stats, weight, training, grads, constants, N,
                              C, S, t, work)
        else:
            for t in prange(tiles, schedule='dynamic', num_threads=n_threads):
                backward_slab(dy, y, x, g, dx, stats, weight, training, grads, constants, N,
                              C, S, t, thread_work(work, n_threads))
        return 0
    partials = <double*>malloc((2 * C * wave + 2 * C) * sizeof(double))
    if partials == NULL:
        return OUT_OF_MEMORY
    sums = partials + 2 * C * wave             # sum(dy)[C], then sum(dy * (x - mean))[C]
    for c in range(2 * C):
        sums[c] = 0.0
    b0 = 0
    while b0 < batch_tiles:
        nb = min(wave, batch_tiles - b0)
        # Slab (b0 + b, t): its sum(dy) at partials[b * C + c0:], its sum(dy * (x - mean))
        # at partials[(wave + b) * C + c0:].
        for u in prange(nb * tiles, schedule='dynamic', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            offset = slab_offset(b0 * tiles + u, N, C, S)
            c0 = slab_first_channel(u, C, S)
            slab_grad_sums(dy + offset, shifted(y, offset), x + offset, shifted_out(g, offset),
                           slab_batch_items(b0 * tiles + u, N, C, S), C, S,
                           slab_channels(u, C, S), stats + c0, partials + (u // tiles) * C + c0,
                           partials + (wave + u // tiles) * C + c0, thread_work(work, n_threads))
        for c in range(C):
            for b in range(nb):
                sums[c] += partials[b * C + c]
                sums[C + c] += partials[(wave + b) * C + c]
        b0 += nb
    for c in range(C):
        finish_channel(sums[c], sums[C + c], stats, weight, <double>(N * S), training, c, C,
                       grads, constants)
    free(partials)
    for u in prange(batch_tiles * tiles, schedule='dynamic', num_threads=n_threads,
                    use_threads_if=n_threads > 1):
        offset = slab_offset(u, N, C, S)
        c0 = slab_first_channel(u, C, S)
        slab_input_grad(grad + offset, x + offset, dx + offset, slab_batch_items(u, N, C, S),
                        C, S, slab_channels(u, C, S), &constants[c0], &constants[C + c0],
                        &constants[2 * C + c0], &constants[3 * C + c0], training,
                        thread_work(work, n_threads))
    return 0


# ---------------------------------------------------------------- channels-last (R, C)

cdef inline void add_block_sums(const double* partials, Py_ssize_t blocks, Py_ssize_t wave,
                                Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                double* sums) noexcept nogil:
    # Add a wave's block sums into the running sums of channels c0 <= c < c1, in block
    # order: sum(dy) from partials[b * C + c] into sums[c], sum(dy * (x - mean)) from
    # partials[(wave + b) * C + c] into sums[C + c].  Each channel's additions are those of
    # one ordered sum over all blocks, whatever the waves.
    cdef Py_ssize_t b, c
    for b in range(blocks):
        for c in range(c0, c1):
            sums[c] += partials[b * C + c]
            sums[C + c] += partials[(wave + b) * C + c]


cdef inline void input_grad_block_nhwc(const data_t* grad, const data_t* x, data_t* dx,
                                       const floating* constants, Py_ssize_t R, Py_ssize_t C,
                                       Py_ssize_t rows, Py_ssize_t b, bint training,
                                       bint stream, float* work) noexcept nogil:
    # dx for row block b; constants: k[C], a[C], mean_hi[C], b[C] back to back.
    if training:
        rows_input_grad(grad + b * rows * C, x + b * rows * C, dx + b * rows * C,
                        block_rows(R, rows, b), C, constants, constants + C,
                        constants + 2 * C, constants + 3 * C, stream, work)
    else:
        # dx = (dy - 0) * k + 0: mean_hi and b are zero in eval mode; x is not read.
        rows_normalize(grad + b * rows * C, dx + b * rows * C, block_rows(R, rows, b), C,
                       constants + 2 * C, constants, constants + 3 * C, stream, work)


cdef int backward_nhwc(const data_t* dy, const data_t* y, const data_t* x, data_t* g,
                       data_t* dx, const double* stats, const param_t* weight,
                       bint training, double* grads, floating* constants, Py_ssize_t R,
                       Py_ssize_t C, int n_threads, bint stream, float* work) noexcept nogil:
    # Per-block sums of all channels (vectorized over C), a wave of partials_wave(C) blocks
    # at a time, added per channel in block order (add_block_sums), then a pass writing dx.
    # DRAM: dy and x read twice (x once in eval mode), dx written once.
    cdef Py_ssize_t rows = rows_per_block(C)
    cdef Py_ssize_t blocks = block_count(R, rows)
    cdef Py_ssize_t wave = min(blocks, partials_wave(C))
    cdef Py_ssize_t tiles = (C + COMBINE_TILE - 1) // COMBINE_TILE
    cdef Py_ssize_t b, b0, nb, t, c
    # Block b of a wave: its sum(dy) at partials[b * C:], its sum(dy * (x - mean)) at
    # partials[(wave + b) * C:]; then the running sums (2 * C, zeroed), then each thread's
    # scratch for the loops (2 * C each).
    cdef double* partials = <double*>malloc(2 * (wave + 1 + n_threads) * C * sizeof(double))
    cdef double* sums
    cdef double* thread_scratch
    cdef const data_t* grad = dy if g == NULL else g
    # Blocks whose rows the sums walk badly from memory are read linearly first:
    # (32, 56, 56, 256) float32, 1 thread, 40 -> 32 ms; (32, 28, 28, 512) 22 -> 18 ms.
    cdef bint touch = touches_row_blocks(C, sizeof(data_t))
    if partials == NULL:
        return OUT_OF_MEMORY
    sums = partials + 2 * wave * C
    thread_scratch = sums + 2 * C
    for c in range(2 * C):
        sums[c] = 0.0
    b0 = 0
    while b0 < blocks:
        nb = min(wave, blocks - b0)
        if n_threads == 1:                      # no OpenMP region: partition.pxd, serial calls
            for b in range(nb):
                block_grad_sums(dy, y, x, g, (b0 + b) * rows * C, block_rows(R, rows, b0 + b),
                                C, stats, partials + b * C, partials + (wave + b) * C, touch,
                                thread_scratch, work)
        else:
            for b in prange(nb, schedule='dynamic', num_threads=n_threads):
                block_grad_sums(dy, y, x, g, (b0 + b) * rows * C, block_rows(R, rows, b0 + b),
                                C, stats, partials + b * C, partials + (wave + b) * C, touch,
                                thread_scratch + 2 * C * thread_slot(n_threads),
                                thread_work(work, n_threads))
        if n_threads == 1 or nb * C <= 65536:   # a small combine: serial, no OpenMP region
            add_block_sums(partials, nb, wave, C, 0, C, sums)
        else:
            for t in prange(tiles, schedule='dynamic', num_threads=n_threads):
                add_block_sums(partials, nb, wave, C, t * COMBINE_TILE,
                               min(C, (t + 1) * COMBINE_TILE), sums)
        b0 += nb
    for c in range(C):
        finish_channel(sums[c], sums[C + c], stats, weight, <double>R, training, c, C, grads,
                       constants)
    if n_threads == 1:
        for b in range(blocks):
            input_grad_block_nhwc(grad, x, dx, constants, R, C, rows, b, training, stream,
                                  work)
    else:
        for b in prange(blocks, schedule='dynamic', num_threads=n_threads):
            input_grad_block_nhwc(grad, x, dx, constants, R, C, rows, b, training, stream,
                                  thread_work(work, n_threads))
    free(partials)
    return 0


cdef inline int backward_any(const data_t* dy, const data_t* y, const data_t* x,
                             data_t* g, data_t* dx, const double* stats,
                             const param_t* weight, bint training, double* grads,
                             floating* constants, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             int n_threads, bint stream, float* work) noexcept nogil:
    if S == 1:
        return backward_nhwc(dy, y, x, g, dx, stats, weight, training, grads, constants, N, C,
                             n_threads, stream, work)
    if uses_slabs(S):
        return backward_slabs_nchw(dy, y, x, g, dx, stats, weight, training, grads, constants,
                                   N, C, S, n_threads, work)
    return backward_nchw(dy, y, x, g, dx, stats, weight, training, grads, constants, N, C, S,
                         n_threads, stream, work)


def backward(dy, x, dx, stats, weight, bint training, grads, Py_ssize_t N, Py_ssize_t C,
             Py_ssize_t S, int n_threads, bint stream, y=None, dresidual=None):
    """dx, and grads = [grad_weight, grad_bias] (float64), for a forward that used the
    statistics in stats ([mean, invstd]).  S == 1 selects the channels-last kernel;
    stream writes dx with non-temporal stores.

    Fused epilogue: y (the forward's output, dense like x, overlapping neither dx nor
    dresidual) for a forward with ReLU, and dresidual (a dense array like x, overlapping
    nothing) for one with a residual, which receives the residual's gradient; dx then
    holds the gradient with respect to x as usual."""
    # The C boundary (boundary.pxd): every buffer against the (N, C, S) view.  dx may be dy
    # itself; y and dresidual overlap nothing they are read or written with.
    check_dims(N, C, S, n_threads, training)
    if not isinstance(dy, cnp.ndarray):
        raise TypeError(f"cpubn kernel: dy must be a numpy array, got {type(dy).__name__}")
    cdef int kind = data_kind(<cnp.ndarray>dy)
    checked_array(dy, "dy", N * C * S, kind, False)
    checked_array(x, "x", N * C * S, kind, False)
    checked_array(dx, "dx", N * C * S, kind, True)
    if y is not None:
        checked_array(y, "y", N * C * S, kind, False)
    if dresidual is not None:
        checked_array(dresidual, "dresidual", N * C * S, kind, True)
    checked_array(stats, "stats", -2 * C, -1, False)
    checked_array(grads, "grads", -2 * C, -1, True)
    check_no_overlap(dy, dx, "dy", "dx", True)
    check_no_overlap(x, dx, "x", "dx", False)
    check_no_overlap(y, dx, "y", "dx", False)
    for other, other_name in ((dy, "dy"), (x, "x"), (y, "y"), (dx, "dx")):
        check_no_overlap(dresidual, other, "dresidual", other_name, False)
    cdef bint param32 = check_params((weight,), ("weight",), C,
                                     kind == DATA_FLOAT16 or kind == DATA_BFLOAT16)
    cdef void* pdy = data_of(dy)
    cdef void* py = data_of(y)
    cdef void* px = data_of(x)
    cdef void* pdx = data_of(dx)
    # Where g goes: the residual's gradient is g itself; otherwise dx holds g until the
    # input-gradient pass overwrites it.  NULL: no epilogue, the kernels read dy.
    cdef void* pg = data_of(dresidual) if dresidual is not None else (
        pdx if y is not None else NULL)
    if pg == pdx:
        # dx's lines are already in cache, holding g: overwrite them there.  Streaming
        # stores would evict them first, which costs more than it saves (measured).
        stream = False
    cdef void* pw = data_of(weight)
    cdef const double* ps = <const double*>data_of(stats)
    cdef double* pgr = <double*>data_of(grads)
    cdef int status = UNSUPPORTED_TYPES
    # Per-channel constants in the compute type (at most a double each).
    cdef void* pc = malloc(4 * C * sizeof(double))
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
            status = backward_any(<float*>pdy, <float*>py, <float*>px, <float*>pg,
                                  <float*>pdx, ps, <float*>pw, training, pgr, <float*>pc, N,
                                  C, S, n_threads, stream, work)
        elif kind == DATA_FLOAT32:
            status = backward_any(<float*>pdy, <float*>py, <float*>px, <float*>pg,
                                  <float*>pdx, ps, <double*>pw, training, pgr, <float*>pc, N,
                                  C, S, n_threads, stream, work)
        elif kind == DATA_FLOAT64 and param32:
            status = backward_any(<double*>pdy, <double*>py, <double*>px, <double*>pg,
                                  <double*>pdx, ps, <float*>pw, training, pgr, <double*>pc, N,
                                  C, S, n_threads, stream, work)
        elif kind == DATA_FLOAT64:
            status = backward_any(<double*>pdy, <double*>py, <double*>px, <double*>pg,
                                  <double*>pdx, ps, <double*>pw, training, pgr, <double*>pc,
                                  N, C, S, n_threads, stream, work)
        elif kind == DATA_FLOAT16 and param32:
            status = backward_any(<cpubn_half*>pdy, <cpubn_half*>py, <cpubn_half*>px,
                                  <cpubn_half*>pg, <cpubn_half*>pdx, ps, <float*>pw, training,
                                  pgr, <float*>pc, N, C, S, n_threads, stream, work)
        elif kind == DATA_BFLOAT16 and param32:
            status = backward_any(<cpubn_bfloat16*>pdy, <cpubn_bfloat16*>py,
                                  <cpubn_bfloat16*>px, <cpubn_bfloat16*>pg,
                                  <cpubn_bfloat16*>pdx, ps, <float*>pw, training, pgr,
                                  <float*>pc, N, C, S, n_threads, stream, work)
    free(pc)
    free(work)
    check_status(status)
