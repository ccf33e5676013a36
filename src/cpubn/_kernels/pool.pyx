"""Recycled memory for large results.

A new output buffer is fresh memory: the operating system zeroes every page as it is first
written, which costs about as much as the normalization itself, so an allocating call
took about twice the time of one writing into a preallocated `out`.  Results of at least
cpubn._core.dispatch.POOL_MIN_BYTES are therefore placed in blocks from this pool: an ordinary
NumPy array whose `base` is the block.  When the last reference to the array (its views
included) goes, the block's memory is kept here instead of being given back to the
system, and the next result of the same byte size reuses it, already mapped.  The memory
is reused only once nothing can reach it any more, so no result ever aliases another.

The pool keeps at most `limit` bytes of unused blocks (CPUBN_POOL_MIB; by default 1 GiB,
or an eighth of the machine's memory if that is less; 0 turns recycling off), the least
recently returned given back first, and release_pooled_memory() gives all of them back.  Everything here runs with the GIL held
(a block is returned from its __dealloc__), which serializes the pool.
"""
import os


cimport numpy as cnp

cnp.import_array()


cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #include <unistd.h>
    #endif
    /* A block's memory comes straight from the system (mmap) and goes straight back to it
     * (munmap): malloc would take blocks below its mmap threshold from the heap, and glibc
     * raises that threshold up to 32 MiB once any program frees a large array, after which
     * free() keeps the pages and releasing the pool gives nothing back.  The mapping starts
     * on a 2 MiB boundary, so transparent huge pages cover all of it (a page fault per
     * 2 MiB instead of per 4 KiB the first time it is written).  Elsewhere: malloc. */
    static size_t cpubn_block_bytes(size_t n)
    {
    #if defined(__linux__)
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        return n == 0 ? page : (n + page - 1) / page * page;
    #else
        return n == 0 ? 1 : n;
    #endif
    }

    static void *cpubn_block_alloc(size_t n)
    {
    #if defined(__linux__)
        const size_t huge = (size_t)1 << 21;
        size_t bytes = cpubn_block_bytes(n);
        if (bytes > SIZE_MAX - huge) return NULL;
        char *p = (char *)mmap(NULL, bytes + huge, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        char *start = (char *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
        if (start > p) (void)munmap(p, (size_t)(start - p));
        char *end = p + bytes + huge;
        if (end > start + bytes) (void)munmap(start + bytes, (size_t)(end - start - bytes));
    #if defined(MADV_HUGEPAGE)
        (void)madvise(start, bytes, MADV_HUGEPAGE);
    #endif
        return start;
    #else
        return malloc(cpubn_block_bytes(n));
    #endif
    }

    static void cpubn_block_free(void *p, size_t n)
    {
    #if defined(__linux__)
        if (p != NULL) (void)munmap(p, cpubn_block_bytes(n));
    #else
        (void)n;
        free(p);
    #endif
    }
    """
    void* cpubn_block_alloc(size_t n)
    void cpubn_block_free(void* p, size_t n)


cdef enum:
    MAX_UNUSED = 64             # unused blocks kept, at most


cdef void* unused_data[MAX_UNUSED]
cdef size_t unused_size[MAX_UNUSED]
cdef int unused_count = 0
cdef size_t unused_bytes = 0
cdef size_t limit = 0


cdef size_t _limit_from_environment() except? 0:
    text = os.environ.get("CPUBN_POOL_MIB", "").strip()
    if not text:
        # 1 GiB, or an eighth of the machine's memory where that is less.
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            physical = 8 << 30
        return <size_t>min(1 << 30, physical // 8)
    try:
        mib = int(text)
    except ValueError:
        raise ValueError(f"CPUBN_POOL_MIB must be a whole number of MiB, got {text!r}") from None
    if mib < 0:
        raise ValueError(f"CPUBN_POOL_MIB must be >= 0, got {mib}")
    # A limit in bytes must fit a size_t: larger ones wrapped to a small (even 0) limit.
    if mib > (<size_t>-1) >> 20:
        raise ValueError(f"CPUBN_POOL_MIB is too large ({mib} MiB: at most "
                         f"{(<size_t>-1) >> 20})")
    return <size_t>mib << 20


limit = _limit_from_environment()


cdef void drop_oldest() noexcept:
    global unused_count, unused_bytes
    cdef int i
    cpubn_block_free(unused_data[0], unused_size[0])
    unused_bytes -= unused_size[0]
    for i in range(1, unused_count):
        unused_data[i - 1] = unused_data[i]
        unused_size[i - 1] = unused_size[i]
    unused_count -= 1


cdef void give_back(void* data, size_t size) noexcept:
    # A block nothing refers to any more: keep it (the oldest kept ones make room) or free it.
    global unused_count, unused_bytes
    if size > limit:
        cpubn_block_free(data, size)
        return
    while unused_count > 0 and (unused_count == MAX_UNUSED or unused_bytes + size > limit):
        drop_oldest()
    unused_data[unused_count] = data
    unused_size[unused_count] = size
    unused_count += 1
    unused_bytes += size


cdef void* take(size_t size) noexcept:
    # The most recently returned unused block of exactly `size` bytes, or NULL.
    global unused_count, unused_bytes
    cdef int i, j
    cdef void* data
    for i in range(unused_count - 1, -1, -1):
        if unused_size[i] == size:
            data = unused_data[i]
            for j in range(i + 1, unused_count):
                unused_data[j - 1] = unused_data[j]
                unused_size[j - 1] = unused_size[j]
            unused_count -= 1
            unused_bytes -= size
            return data
    return NULL


cdef class Block:
    """The memory of one pooled array (its `base`); returned to the pool when it dies."""
    cdef void* data
    cdef size_t size

    def __dealloc__(self):
        if self.data != NULL:
            give_back(self.data, self.size)

    @property
    def nbytes(self):
        return self.size


def empty(shape, dtype):
    """(an uninitialized C-contiguous array of `shape` and `dtype`, whether its memory is
    fresh).  Memory from an unused block of the same byte size when there is one (not
    fresh: already mapped), else newly allocated (fresh: the first write faults its pages
    in).  For results of at least a few MiB; the caller writes every element."""
    cdef cnp.dtype descr = cnp.dtype(dtype)
    cdef int ndim = len(shape), k
    cdef cnp.npy_intp dims[32]
    cdef size_t size = <size_t>descr.itemsize
    if ndim > 32:
        raise ValueError(f"cpubn: too many dimensions ({ndim}) for a pooled array")
    for k in range(ndim):
        dims[k] = shape[k]
        size *= <size_t>dims[k]
    cdef void* data = take(size)
    cdef bint fresh = data == NULL
    if fresh:
        data = cpubn_block_alloc(size)
        if data == NULL:
            raise MemoryError(f"cpubn: could not allocate {size} bytes for a result")
    cdef Block block = Block.__new__(Block)
    block.data = data
    block.size = size
    cdef cnp.ndarray array = cnp.PyArray_SimpleNewFromData(ndim, dims, descr.type_num, data)
    cnp.set_array_base(array, block)
    return array, fresh


def unused_pooled_bytes():
    """Bytes of unused blocks the pool keeps now (for tests and diagnostics)."""
    return unused_bytes


def pool_limit_bytes():
    """The most unused bytes the pool keeps (CPUBN_POOL_MIB; 0: recycling off)."""
    return limit


def release_pooled_memory():
    """Give every unused pooled block back to the system; returns the bytes released."""
    cdef size_t released = unused_bytes
    while unused_count > 0:
        drop_oldest()
    return released
