"""Facts about arrays that the Python layer checks on every call, computed from the
array structs directly: the same check through NumPy's Python API costs more than a small
call's kernel."""
cimport numpy as cnp

cnp.import_array()


cdef inline void byte_bounds(cnp.ndarray a, Py_ssize_t* low, Py_ssize_t* high) noexcept:
    # [low, high): the bytes any element of a can touch (a's extent in memory).
    cdef Py_ssize_t start = <Py_ssize_t>cnp.PyArray_DATA(a), stop = start
    cdef int k
    cdef Py_ssize_t extent
    if cnp.PyArray_SIZE(a) == 0:
        low[0] = high[0] = start
        return
    for k in range(cnp.PyArray_NDIM(a)):
        extent = (cnp.PyArray_DIM(a, k) - 1) * cnp.PyArray_STRIDE(a, k)
        if extent < 0:
            start += extent
        else:
            stop += extent
    low[0] = start
    high[0] = stop + cnp.PyArray_ITEMSIZE(a)


def first_bounds_overlap(cnp.ndarray out, tuple pairs, Py_ssize_t start=0):
    """Index (from `start`) of the first (array, name) pair of `pairs` whose array is an
    ndarray with a memory extent that intersects out's, or -1; other objects (None, lists)
    are skipped.  Extents are a superset test, like np.may_share_memory: the caller
    confirms a hit with np.shares_memory."""
    cdef Py_ssize_t out_low, out_high, low, high, i
    byte_bounds(out, &out_low, &out_high)
    if out_low == out_high:
        return -1
    for i in range(start, len(pairs)):
        other = (<tuple>pairs[i])[0]
        if not isinstance(other, cnp.ndarray):
            continue
        byte_bounds(<cnp.ndarray>other, &low, &high)
        if low < out_high and out_low < high and low < high:
            return i
    return -1


def params_unchanged(tuple current, tuple known, Py_ssize_t length, object dtype):
    """True when every entry of `current` is the same object as in `known` and each array
    among them still is what the kernels read: one-dimensional, `length` values of
    exactly `dtype`, C-contiguous.  (Arrays can be resized, retyped or restrided in place,
    so identity alone does not say that.)"""
    cdef Py_ssize_t i
    cdef cnp.ndarray a
    cdef cnp.dtype want = None if dtype is None else <cnp.dtype?>dtype    # None: no arrays
    if len(current) != len(known):
        return False
    for i in range(len(current)):
        item = current[i]
        if item is not known[i]:
            return False
        if item is None:
            continue
        if want is None:
            return False
        a = <cnp.ndarray?>item
        if (cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIM(a, 0) != length
                or not (<object>cnp.PyArray_DESCR(a) is want
                        or cnp.PyArray_EquivTypes(a.dtype, want))
                or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
            return False
    return True



cdef inline bint bounds_meet(Py_ssize_t out_low, Py_ssize_t out_high, object other) noexcept:
    # Whether other (an ndarray, else skipped) has an extent that meets [out_low, out_high).
    cdef Py_ssize_t low, high
    if not isinstance(other, cnp.ndarray):
        return False
    byte_bounds(<cnp.ndarray>other, &low, &high)
    return low < out_high and out_low < high and low < high


def out_still_fits(object out, cnp.ndarray x, tuple shape, tuple strides, object dtype,
                   object grad_weight, object grad_bias):
    """For a forward's `out` already checked once: True when out is still a plain,
    writeable ndarray of `shape`, `strides` and exactly `dtype`, x has that shape and
    dtype, and out's extent meets neither x's nor grad_weight's nor grad_bias's (None or
    non-arrays are skipped).  One call for the facts the caller must see again on every
    call with the same out (cpubn._layers.batchnorm: _check_forward_out)."""
    cdef cnp.ndarray a
    cdef Py_ssize_t out_low, out_high, k, ndim
    if type(out) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>out
    ndim = cnp.PyArray_NDIM(a)
    if (ndim != len(shape) or cnp.PyArray_NDIM(x) != ndim
            or <object>cnp.PyArray_DESCR(a) is not dtype
            or <object>cnp.PyArray_DESCR(x) is not dtype
            or not cnp.PyArray_ISWRITEABLE(a)):
        return False
    for k in range(ndim):
        if (cnp.PyArray_DIM(a, k) != <Py_ssize_t>shape[k]
                or cnp.PyArray_DIM(x, k) != <Py_ssize_t>shape[k]
                or cnp.PyArray_STRIDE(a, k) != <Py_ssize_t>strides[k]):
            return False
    byte_bounds(a, &out_low, &out_high)
    if out_low == out_high:
        return True
    return not (bounds_meet(out_low, out_high, x) or bounds_meet(out_low, out_high, grad_weight)
                or bounds_meet(out_low, out_high, grad_bias))
