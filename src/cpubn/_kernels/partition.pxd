# The work partition shared by every kernel.
#
# Reductions are split into partials whose boundaries depend only on the array's shape,
# never on the thread count, and partials are always combined in the same order.  The
# threads only decide who computes which partial, so every result is bitwise identical
# whatever the number of threads.

cdef extern from "loops.h":
    # Channels-first: a run x[n, c, :] longer than this is reduced in chunks of this many
    # elements (64 KiB of float32: the second pass of a chunk reads from L1/L2).  Defined
    # in loops.h, whose half-precision loops reduce a chunk as one tile.
    enum: RUN_CHUNK "CPUBN_RUN_CHUNK"
    # Channels-first runs of at most SLAB_MAX_RUN values (7x7, 14x14, 28x28 maps) take the
    # slab kernels, at most SLAB_MAX_WIDTH channels per slab (loops_slab.h.tp).
    enum: SLAB_MAX_RUN "CPUBN_SLAB_MAX_RUN"
    enum: SLAB_MAX_WIDTH "CPUBN_SLAB_MAX_WIDTH"
    # A slab takes about SLAB_PIECE_ELEMS contiguous values of each of its batch items.
    enum: SLAB_PIECE_ELEMS "CPUBN_SLAB_PIECE"


cdef enum:
    # Channels-last: a block of rows holds about this many elements (rows * C); 256 KiB of
    # float32, so the block's second pass reads from L2 (rows_per_block; wide rows take
    # taller blocks, below).
    ROW_BLOCK_ELEMS = 65536
    # Wide rows (C > 1024): a block still holds MIN_BLOCK_ROWS rows, as long as that is at
    # most WIDE_BLOCK_ELEMS elements (four times ROW_BLOCK_ELEMS).  A block's partials are two
    # doubles per channel: blocks of 16 rows of 4096 channels made them a quarter of the
    # data's size again, and their combine cost more than the taller blocks' reads.
    MIN_BLOCK_ROWS = 64
    WIDE_BLOCK_ELEMS = 262144
    # Channels-last partials are combined in parallel over tiles of this many channels.
    COMBINE_TILE = 256
    # Channels-first with short runs (small H*W): a thread takes a block of adjacent
    # channels so that each batch item gives it one contiguous piece of about this many
    # elements instead of one short run far from the next.
    CHANNEL_BLOCK_ELEMS = 1024
    MAX_CHANNEL_BLOCK = 64
    # The channels-first split path computes its partials a wave of batch items at a time,
    # at most this many work items per wave (or one batch item's), and folds each wave into
    # running per-channel results before the next: its scratch (two doubles per item) stays
    # below 4 MiB whatever N.  Waves cut the same ordered merge into pieces: the results do
    # not depend on them, nor on the thread count.
    SPLIT_WAVE_ITEMS = 1 << 18
    # Dynamic scheduling hands work items out in chunks of at least this many elements:
    # each hand-out is an atomic operation on a shared counter (tens of ns, more between
    # cores), which one item per hand-out pays for every 7x7 run.  Chunking decides only
    # which thread computes an item, never what it computes.
    SCHEDULE_CHUNK_ELEMS = 16384
    # Serial calls: a parallel loop with use_threads_if false still opens an OpenMP region
    # of one thread, and libgomp closes every region with a futex wake-up system call,
    # which costs several times a whole small eval kernel.  So the loops that small calls run (the eval normalizations, the channels-last and
    # one-slab statistics and backward) take a plain loop over the same work items, with
    # the same bodies, when n_threads == 1.
    # Slabs (short channels-first runs): a slab of all N batch items up to this many
    # elements (1 MiB of float32) is one work item whose statistics are complete, so it
    # is normalized (or differentiated) right after, while it is still in L2: x is read
    # once from memory.  Larger batches are cut into slabs of about SLAB_ELEMS elements,
    # whose partials are merged per channel in batch order before a second pass.
    SLAB_FUSED_ELEMS = 1 << 18
    SLAB_ELEMS = 1 << 16


cdef inline Py_ssize_t chunks_per_run(Py_ssize_t S) noexcept nogil:
    return (S + RUN_CHUNK - 1) // RUN_CHUNK


cdef inline Py_ssize_t chunk_length(Py_ssize_t S, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t rest = S - k * RUN_CHUNK
    return RUN_CHUNK if rest > RUN_CHUNK else rest


cdef inline Py_ssize_t channels_per_block(Py_ssize_t S) noexcept nogil:
    cdef Py_ssize_t channels = CHANNEL_BLOCK_ELEMS // S
    if channels < 1:
        return 1
    return MAX_CHANNEL_BLOCK if channels > MAX_CHANNEL_BLOCK else channels


cdef inline Py_ssize_t rows_per_pass_block(Py_ssize_t C) noexcept nogil:
    # The element-wise passes over channels-last rows (normalization, dx) take blocks of
    # about ROW_BLOCK_ELEMS elements whatever C: they keep no partials, so the taller
    # blocks of wide rows would only leave threads without work.
    return ROW_BLOCK_ELEMS // C if C < ROW_BLOCK_ELEMS else 1


cdef inline Py_ssize_t rows_per_block(Py_ssize_t C) noexcept nogil:
    # The reductions' row blocks (statistics, gradient sums).
    cdef Py_ssize_t rows = ROW_BLOCK_ELEMS // C if C < ROW_BLOCK_ELEMS else 1
    cdef Py_ssize_t wide_rows
    if rows < MIN_BLOCK_ROWS:                   # wide rows: taller blocks, up to a limit
        wide_rows = WIDE_BLOCK_ELEMS // C
        if wide_rows > MIN_BLOCK_ROWS:
            wide_rows = MIN_BLOCK_ROWS
        if wide_rows > rows:
            rows = wide_rows
    return rows


cdef inline Py_ssize_t block_count(Py_ssize_t R, Py_ssize_t rows) noexcept nogil:
    return (R + rows - 1) // rows


cdef enum:
    # Channels-last with few rows: the statistics take column tiles of all R rows and a
    # multiple of COLUMN_TILE_MIN_WIDTH channels, at most COLUMN_TILE_BYTES each, so that
    # a tile's two passes read it from L1; each tile's statistics are complete, with no
    # block partials to combine.  From R * itemsize * COLUMN_TILE_MIN_WIDTH >
    # COLUMN_TILE_BYTES on, a row of a tile would be less than two cache lines and the
    # row blocks read faster.  The tile width (the loops' CPUBN_ROW_TILE) depends on the
    # shape only.
    COLUMN_TILE_BYTES = 32768
    COLUMN_TILE_MIN_WIDTH = 128


cdef inline bint uses_columns(Py_ssize_t R, Py_ssize_t itemsize) noexcept nogil:
    # Half-precision data keeps the row blocks (its loops walk converted tiles).
    return itemsize >= 4 and R * itemsize * COLUMN_TILE_MIN_WIDTH <= COLUMN_TILE_BYTES


cdef inline Py_ssize_t column_width(Py_ssize_t R, Py_ssize_t C, Py_ssize_t itemsize) noexcept nogil:
    cdef Py_ssize_t width = COLUMN_TILE_BYTES // (R * itemsize)
    width -= width % COLUMN_TILE_MIN_WIDTH
    return C if width >= C else width


cdef inline Py_ssize_t block_rows(Py_ssize_t R, Py_ssize_t rows, Py_ssize_t b) noexcept nogil:
    cdef Py_ssize_t rest = R - b * rows
    return rows if rest > rows else rest


# The channels-first split path (few channels): work item u walks memory in order,
# u = (n * C + c) * chunks + k, and stores its partial with channel c's others in the
# (n, chunk) order that the per-channel merge (and the channel-block path) uses.
cdef inline Py_ssize_t split_item_offset(Py_ssize_t u, Py_ssize_t S,
                                         Py_ssize_t chunks) noexcept nogil:
    return (u // chunks) * S + (u % chunks) * RUN_CHUNK


cdef inline Py_ssize_t split_item_channel(Py_ssize_t u, Py_ssize_t C,
                                          Py_ssize_t chunks) noexcept nogil:
    return (u // chunks) % C


cdef inline Py_ssize_t split_item_slot(Py_ssize_t u, Py_ssize_t N, Py_ssize_t C,
                                       Py_ssize_t chunks) noexcept nogil:
    return (split_item_channel(u, C, chunks) * N + u // (C * chunks)) * chunks + u % chunks


cdef inline Py_ssize_t split_wave(Py_ssize_t C, Py_ssize_t chunks) noexcept nogil:
    # Batch items per wave of the split path (at least one).
    cdef Py_ssize_t per_item = C * chunks
    return SPLIT_WAVE_ITEMS // per_item if per_item < SPLIT_WAVE_ITEMS else 1


cdef inline Py_ssize_t schedule_chunk(Py_ssize_t item_elems) noexcept nogil:
    # Work items per hand-out of a dynamic schedule over items of item_elems elements.
    if item_elems >= SCHEDULE_CHUNK_ELEMS:
        return 1
    return SCHEDULE_CHUNK_ELEMS // (item_elems if item_elems > 0 else 1)


# ---------------------------------------------------------------- slabs (short runs)
# A slab is slab_items(N, C, S) consecutive batch items x slab_width(C, S) consecutive
# channels (the last ones in each direction may be smaller): the work items of the
# short-run kernels.  The geometry depends on the shape only, so the partials, their merge
# order and every result are the same whatever the thread count.

cdef inline bint uses_slabs(Py_ssize_t S) noexcept nogil:
    return S <= SLAB_MAX_RUN


cdef inline Py_ssize_t slab_width(Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    # At most SLAB_PIECE_ELEMS contiguous values per batch item (the size of the slab
    # loops' per-thread column sums).  S <= SLAB_MAX_RUN leaves at least 4 channels.
    cdef Py_ssize_t width = SLAB_PIECE_ELEMS // S
    if width < 1:
        width = 1
    if width > SLAB_MAX_WIDTH:
        width = SLAB_MAX_WIDTH
    return C if width > C else width


cdef inline Py_ssize_t slab_items(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    # Batch items per slab: all N when the slab stays small enough to be normalized from
    # cache (slabs_complete), else about SLAB_ELEMS elements' worth.
    cdef Py_ssize_t piece = slab_width(C, S) * S
    cdef Py_ssize_t items
    if N * piece <= SLAB_FUSED_ELEMS:
        return N
    items = SLAB_ELEMS // piece
    return items if items > 1 else 1


cdef inline bint slabs_complete(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    # Each slab holds whole channels: its statistics are final.
    return slab_items(N, C, S) >= N


cdef inline Py_ssize_t slab_channel_tiles(Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    return (C + slab_width(C, S) - 1) // slab_width(C, S)


cdef inline Py_ssize_t slab_batch_tiles(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    return (N + slab_items(N, C, S) - 1) // slab_items(N, C, S)


cdef inline Py_ssize_t partials_wave(Py_ssize_t C) noexcept nogil:
    # Work items per wave of partials that keep two doubles per item and channel (the
    # slabs' batch tiles, the channels-last row blocks): the scratch stays below
    # 2 * SPLIT_WAVE_ITEMS doubles whatever N.
    return SPLIT_WAVE_ITEMS // C if C < SPLIT_WAVE_ITEMS else 1


cdef inline Py_ssize_t slab_offset(Py_ssize_t item, Py_ssize_t N, Py_ssize_t C,
                                   Py_ssize_t S) noexcept nogil:
    # Slab `item` (batch tile item // channel tiles, channel tile item % channel tiles,
    # i.e. memory order): the element offset of its first run.
    cdef Py_ssize_t tiles = slab_channel_tiles(C, S)
    return ((item // tiles) * slab_items(N, C, S) * C + (item % tiles) * slab_width(C, S)) * S


cdef inline Py_ssize_t slab_first_channel(Py_ssize_t item, Py_ssize_t C,
                                          Py_ssize_t S) noexcept nogil:
    return (item % slab_channel_tiles(C, S)) * slab_width(C, S)


cdef inline Py_ssize_t slab_channels(Py_ssize_t item, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef Py_ssize_t rest = C - slab_first_channel(item, C, S)
    return slab_width(C, S) if rest > slab_width(C, S) else rest


cdef inline Py_ssize_t slab_batch_items(Py_ssize_t item, Py_ssize_t N, Py_ssize_t C,
                                        Py_ssize_t S) noexcept nogil:
    cdef Py_ssize_t per = slab_items(N, C, S)
    cdef Py_ssize_t rest = N - (item // slab_channel_tiles(C, S)) * per
    return per if rest > per else rest
