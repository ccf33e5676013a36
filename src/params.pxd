# Per-channel parameters as the kernels see them.

ctypedef fused param_t:
    # dtype of weight, bias and running statistics (the BatchNorm object's dtype), which
    # may differ from the data's dtype.
    float
    double


# An empty weight or bias stands for "affine=False": gamma = 1, beta = 0.
cdef inline double gamma_of(const param_t[::1] weight, Py_ssize_t c) noexcept nogil:
    return <double>weight[c] if weight.shape[0] != 0 else 1.0


cdef inline double beta_of(const param_t[::1] bias, Py_ssize_t c) noexcept nogil:
    return <double>bias[c] if bias.shape[0] != 0 else 0.0
