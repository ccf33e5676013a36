# Per-channel parameters and arrays as the kernels see them, and the entry-point helpers
# that turn validated ndarrays into typed pointers.
cimport numpy as cnp


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


# Entry points receive ndarrays that cpubn._validation and cpubn._dispatch have checked
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


cdef inline int data_kind(object array):
    cdef int type_num = cnp.PyArray_TYPE(<cnp.ndarray>array)
    if type_num == cnp.NPY_FLOAT32:
        return DATA_FLOAT32
    if type_num == cnp.NPY_FLOAT64:
        return DATA_FLOAT64
    if type_num == cnp.NPY_FLOAT16:
        return DATA_FLOAT16
    # ml_dtypes.bfloat16 is a user-defined dtype without a fixed type number; it is the
    # only other dtype cpubn._validation lets through.
    return DATA_BFLOAT16


cdef enum:
    # Kernel status codes (0: success).
    OUT_OF_MEMORY = -1
    UNSUPPORTED_TYPES = -2


cdef inline check_status(int status):
    if status == OUT_OF_MEMORY:
        raise MemoryError("cpubn: could not allocate kernel scratch")
    if status == UNSUPPORTED_TYPES:
        # cpubn._dispatch gives half-precision data float32 parameters; this is a bug guard.
        raise TypeError("cpubn: no kernel for this combination of data and parameter dtypes")


cdef inline bint is_float32(object array):
    return cnp.PyArray_TYPE(<cnp.ndarray>array) == cnp.NPY_FLOAT32


cdef inline bint params_float32(object first, object second):
    # The per-channel arrays of one call share a dtype; float when none is given.
    if first is not None:
        return is_float32(first)
    if second is not None:
        return is_float32(second)
    return True
