# Per-channel parameters and arrays as the kernels see them, and the entry-point helpers
# that turn validated ndarrays into typed pointers and allocate a call's scratch.
cimport numpy as cnp
from libc.stdlib cimport free, malloc

from cpubn._kernels.loops cimport new_work
from cpubn._kernels.partition cimport uses_slabs

cdef extern from "numpy/arrayobject.h":
    int NPY_USERDEF


ctypedef fused param_t:
    # dtype of weight, bias and running statistics (the BatchNorm object's dtype), which
    # may differ from the data's dtype.
    float
    double


# A NULL weight or bias stands for "affine=False": gamma = 1, beta = 0.
cdef inline double gamma_of(const param_t* weight, Py_ssize_t c) noexcept nogil:
    return <double>weight[c] if weight != NULL else 1.0


cdef inline double beta_of(const param_t* bias, Py_ssize_t c) noexcept nogil:
    return <double>bias[c] if bias != NULL else 0.0


# Entry points receive ndarrays that cpubn._core.validation and cpubn._core.dispatch have checked
# (dtype, C-contiguity, lengths), so they read data pointers directly: no buffer or
# memoryview acquisition, which would cost more than a small kernel itself.
cdef inline void* data_of(object array):
    return NULL if array is None else cnp.PyArray_DATA(<cnp.ndarray>array)


cdef enum:
    # Storage type of a data array (data_kind).
    DATA_FLOAT32
    DATA_FLOAT64
    DATA_FLOAT16
    DATA_BFLOAT16


cdef inline int data_kind(cnp.ndarray array) except -1:
    # The storage type of a data array; TypeError for any other dtype (never a default).
    cdef int type_num = cnp.PyArray_TYPE(array)
    if type_num == cnp.NPY_FLOAT32:
        return DATA_FLOAT32
    if type_num == cnp.NPY_FLOAT64:
        return DATA_FLOAT64
    if type_num == cnp.NPY_FLOAT16:
        return DATA_FLOAT16
    # ml_dtypes.bfloat16 is a user-defined dtype without a fixed type number: recognized
    # by its registered number range, size and name.
    if (type_num >= NPY_USERDEF and cnp.PyArray_ITEMSIZE(array) == 2
            and array.dtype.name == "bfloat16"):
        return DATA_BFLOAT16
    raise TypeError(f"cpubn kernel: no loops for data of dtype {array.dtype}")


# ---------------------------------------------------------------- the C boundary
# The entry points check what they are given against what their loops will read and
# write (dtype, contiguity, element count, writeability, overlap) and raise instead of
# running on a wrong buffer: cpubn._core.validation checks user input, these checks keep a
# wrong call from inside cpubn from reading or writing out of bounds.  Each is a few
# C-API calls.

cdef inline cnp.ndarray checked_array(object array, str name, Py_ssize_t size, int kind,
                                      bint writeable):
    # array as an ndarray of data kind `kind` (-1: float64, the statistics' type),
    # C-contiguous, of `size` elements (at least -size when size < 0).
    if not isinstance(array, cnp.ndarray):
        raise TypeError(f"cpubn kernel: {name} must be a numpy array, got "
                        f"{type(array).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>array
    if kind == -1:
        if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT64:
            raise TypeError(f"cpubn kernel: {name} must be float64, got {a.dtype}")
    elif data_kind(a) != kind:
        raise TypeError(f"cpubn kernel: {name} has dtype {a.dtype}, unlike the data")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"cpubn kernel: {name} must be C-contiguous")
    if (cnp.PyArray_SIZE(a) < -size) if size < 0 else (cnp.PyArray_SIZE(a) != size):
        raise ValueError(f"cpubn kernel: {name} has {cnp.PyArray_SIZE(a)} elements, "
                         f"expected {'at least ' if size < 0 else ''}{abs(size)}")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"cpubn kernel: {name} must be writeable")
    return a


cdef inline int check_dims(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int n_threads,
                           bint batch_stats) except -1:
    # The (N, C, S) view: C and S >= 1, N >= 0 (>= 1 when statistics are computed from
    # the batch, so that no channel is empty), and a positive thread count.
    if N < 0 or C < 1 or S < 1 or (batch_stats and N < 1):
        raise ValueError(f"cpubn kernel: impossible dimensions N={N}, C={C}, S={S}")
    if N > 0 and (C > (<Py_ssize_t>1 << 62) // N or N * C > (<Py_ssize_t>1 << 62) // S):
        raise ValueError(f"cpubn kernel: N*C*S overflows (N={N}, C={C}, S={S})")
    if n_threads < 1:
        raise ValueError(f"cpubn kernel: n_threads must be >= 1, got {n_threads}")
    return 0


cdef inline int check_params(tuple arrays, tuple names, Py_ssize_t C,
                             bint half_data) except -1:
    # Per-channel arrays: None or contiguous float32/float64 of C elements, all of one
    # dtype, float32 with half-precision data.  Returns whether they are float32 (True
    # when none is given).
    cdef int first = -1, type_num
    cdef Py_ssize_t i
    for i in range(len(arrays)):
        array = arrays[i]
        if array is None:
            continue
        if not isinstance(array, cnp.ndarray):
            raise TypeError(f"cpubn kernel: {names[i]} must be None or a numpy array, got "
                            f"{type(array).__name__}")
        type_num = cnp.PyArray_TYPE(<cnp.ndarray>array)
        if type_num != cnp.NPY_FLOAT32 and type_num != cnp.NPY_FLOAT64:
            raise TypeError(f"cpubn kernel: {names[i]} must be float32 or float64, got "
                            f"{array.dtype}")
        if first == -1:
            first = type_num
        elif type_num != first:
            raise TypeError(f"cpubn kernel: the per-channel arrays must share one dtype, "
                            f"{names[i]} is {array.dtype}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>array):
            raise ValueError(f"cpubn kernel: {names[i]} must be C-contiguous")
        if cnp.PyArray_SIZE(<cnp.ndarray>array) != C:
            raise ValueError(f"cpubn kernel: {names[i]} has "
                             f"{cnp.PyArray_SIZE(<cnp.ndarray>array)} elements, expected {C}")
    if half_data and first == cnp.NPY_FLOAT64:
        raise TypeError("cpubn kernel: half-precision data takes float32 parameters")
    return first != cnp.NPY_FLOAT64


cdef inline int check_no_overlap(object a, object b, str name_a, str name_b,
                                 bint may_be_same) except -1:
    # a and b (ndarrays or None) share no byte, or (may_be_same) are the same buffer.
    if a is None or b is None:
        return 0
    cdef char* pa = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char* pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    cdef Py_ssize_t na = cnp.PyArray_NBYTES(<cnp.ndarray>a)
    cdef Py_ssize_t nb = cnp.PyArray_NBYTES(<cnp.ndarray>b)
    if na == 0 or nb == 0 or pa + na <= pb or pb + nb <= pa:
        return 0
    if may_be_same and pa == pb and na == nb:
        return 0
    raise ValueError(f"cpubn kernel: {name_a} and {name_b} overlap"
                     + (" (other than being the same array)" if may_be_same else ""))


cdef enum:
    # Kernel status codes (0: success; positive: success with a request to the caller).
    OUT_OF_MEMORY = -1
    UNSUPPORTED_TYPES = -2
    WIDE_NEEDED = 1         # eval: some channels need a float64 recomputation


cdef inline check_status(int status):
    if status == OUT_OF_MEMORY:
        raise MemoryError("cpubn: could not allocate kernel scratch")
    if status == UNSUPPORTED_TYPES:
        # cpubn._core.dispatch gives half-precision data float32 parameters; this is a bug guard.
        raise TypeError("cpubn: no kernel for this combination of data and parameter dtypes")


# ---------------------------------------------------------------- a call's scratch
# Allocated by the entry point before its parallel regions (never on a worker's stack),
# freed after them: the per-channel constants, in the compute type (at most a double
# each), and each thread's slice of `work` (half-precision tiles, the streaming buffer,
# the slab loops' column sums), which float32 / float64 data without streaming and with
# long runs do not need.
cdef struct Scratch:
    void* constants
    float* work


cdef inline Scratch new_scratch(int kind, Py_ssize_t S, int n_threads, bint stream,
                                Py_ssize_t constant_doubles) except *:
    # constant_doubles: how many doubles of per-channel constants (0: none).
    cdef Scratch scratch
    cdef bint needs_work = (stream or kind == DATA_FLOAT16 or kind == DATA_BFLOAT16
                            or (S > 1 and uses_slabs(S)))
    scratch.constants = malloc(constant_doubles * sizeof(double)) if constant_doubles else NULL
    scratch.work = new_work(n_threads) if needs_work else NULL
    if ((constant_doubles and scratch.constants == NULL)
            or (needs_work and scratch.work == NULL)):
        free_scratch(&scratch)
        raise MemoryError("cpubn: could not allocate kernel scratch")
    return scratch


cdef inline void free_scratch(Scratch* scratch) noexcept nogil:
    free(scratch.constants)
    free(scratch.work)
    scratch.constants = NULL
    scratch.work = NULL
