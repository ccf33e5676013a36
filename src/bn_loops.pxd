# Declarations of the C loops in bn_loops.h, and fused-type wrappers so that the Cython
# kernels call one name for float and double (the branch is resolved at compile time).
# The output loops take `stream`: write with non-temporal stores (outputs larger than the
# caches; decided once per call by cpubn._dispatch).
from cython cimport floating

cdef extern from "bn_loops.h" nogil:
    void run_mean_m2_f32(const float* x, Py_ssize_t n, double* mean, double* m2)
    void run_mean_m2_f64(const double* x, Py_ssize_t n, double* mean, double* m2)
    void run_normalize_f32(const float* x, float* y, Py_ssize_t n,
                           float mean_hi, float scale, float shift)
    void run_normalize_f64(const double* x, double* y, Py_ssize_t n,
                           double mean_hi, double scale, double shift)
    void run_grad_sums_f32(const float* dy, const float* x, Py_ssize_t n, double mean,
                           double* sum_dy, double* sum_dy_xmu)
    void run_grad_sums_f64(const double* dy, const double* x, Py_ssize_t n, double mean,
                           double* sum_dy, double* sum_dy_xmu)
    void run_input_grad_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                            float k, float a, float mean_hi, float b)
    void run_input_grad_f64(const double* dy, const double* x, double* dx, Py_ssize_t n,
                            double k, double a, double mean_hi, double b)
    void rows_mean_m2_f32(const float* x, Py_ssize_t rows, Py_ssize_t C, double* mean, double* m2,
                          double* scratch)
    void rows_mean_m2_f64(const double* x, Py_ssize_t rows, Py_ssize_t C, double* mean, double* m2,
                          double* scratch)
    void rows_normalize_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t C,
                            const float* mean_hi, const float* scale, const float* shift)
    void rows_normalize_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean_hi, const double* scale, const double* shift)
    void rows_grad_sums_f32(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean, double* sum_dy, double* sum_dy_xmu)
    void rows_grad_sums_f64(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean, double* sum_dy, double* sum_dy_xmu)
    void rows_input_grad_f32(const float* dy, const float* x, float* dx, Py_ssize_t rows,
                             Py_ssize_t C, const float* k, const float* a, const float* mean_hi,
                             const float* b)
    void rows_input_grad_f64(const double* dy, const double* x, double* dx, Py_ssize_t rows,
                             Py_ssize_t C, const double* k, const double* a,
                             const double* mean_hi, const double* b)
    void run_normalize_stream_f32(const float* x, float* y, Py_ssize_t n,
                                  float mean_hi, float scale, float shift)
    void run_normalize_stream_f64(const double* x, double* y, Py_ssize_t n,
                                  double mean_hi, double scale, double shift)
    void run_input_grad_stream_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                                   float k, float a, float mean_hi, float b)
    void run_input_grad_stream_f64(const double* dy, const double* x, double* dx, Py_ssize_t n,
                                   double k, double a, double mean_hi, double b)
    void rows_normalize_stream_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t C,
                                   const float* mean_hi, const float* scale, const float* shift)
    void rows_normalize_stream_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t C,
                                   const double* mean_hi, const double* scale,
                                   const double* shift)
    void rows_input_grad_stream_f32(const float* dy, const float* x, float* dx, Py_ssize_t rows,
                                    Py_ssize_t C, const float* k, const float* a,
                                    const float* mean_hi, const float* b)
    void rows_input_grad_stream_f64(const double* dy, const double* x, double* dx,
                                    Py_ssize_t rows, Py_ssize_t C, const double* k,
                                    const double* a, const double* mean_hi, const double* b)
    void run_normalize_fused_f32(const float* x, const float* r, float* y, Py_ssize_t n,
                                 float mean_hi, float scale, float shift, int relu)
    void run_normalize_fused_f64(const double* x, const double* r, double* y, Py_ssize_t n,
                                 double mean_hi, double scale, double shift, int relu)
    void run_normalize_fused_stream_f32(const float* x, const float* r, float* y, Py_ssize_t n,
                                        float mean_hi, float scale, float shift, int relu)
    void run_normalize_fused_stream_f64(const double* x, const double* r, double* y,
                                        Py_ssize_t n, double mean_hi, double scale,
                                        double shift, int relu)
    void rows_normalize_fused_f32(const float* x, const float* r, float* y, Py_ssize_t rows,
                                  Py_ssize_t C, const float* mean_hi, const float* scale,
                                  const float* shift, int relu)
    void rows_normalize_fused_f64(const double* x, const double* r, double* y, Py_ssize_t rows,
                                  Py_ssize_t C, const double* mean_hi, const double* scale,
                                  const double* shift, int relu)
    void rows_normalize_fused_stream_f32(const float* x, const float* r, float* y,
                                         Py_ssize_t rows, Py_ssize_t C, const float* mean_hi,
                                         const float* scale, const float* shift, int relu)
    void rows_normalize_fused_stream_f64(const double* x, const double* r, double* y,
                                         Py_ssize_t rows, Py_ssize_t C, const double* mean_hi,
                                         const double* scale, const double* shift, int relu)
    void run_masked_grad_sums_f32(const float* dy, const float* y, const float* x, float* g,
                                  Py_ssize_t n, double mean, double* sum_g, double* sum_g_xmu)
    void run_masked_grad_sums_f64(const double* dy, const double* y, const double* x, double* g,
                                  Py_ssize_t n, double mean, double* sum_g, double* sum_g_xmu)
    void rows_masked_grad_sums_f32(const float* dy, const float* y, const float* x, float* g,
                                   Py_ssize_t rows, Py_ssize_t C, const double* mean,
                                   double* sum_g, double* sum_g_xmu)
    void rows_masked_grad_sums_f64(const double* dy, const double* y, const double* x,
                                   double* g, Py_ssize_t rows, Py_ssize_t C, const double* mean,
                                   double* sum_g, double* sum_g_xmu)
    void combine_row_blocks(const double* means, const double* m2s, Py_ssize_t blocks,
                            Py_ssize_t C, Py_ssize_t rows, Py_ssize_t R, Py_ssize_t c0,
                            Py_ssize_t c1, double* mean, double* m2, double* dev)
    void chan_merge(double* count_a, double* mean_a, double* m2_a,
                    double count_b, double mean_b, double m2_b)


cdef inline void run_mean_m2(const floating* x, Py_ssize_t n, double* mean, double* m2) noexcept nogil:
    if floating is float:
        run_mean_m2_f32(x, n, mean, m2)
    else:
        run_mean_m2_f64(x, n, mean, m2)


cdef inline void run_normalize(const floating* x, floating* y, Py_ssize_t n, floating mean_hi,
                               floating scale, floating shift, bint stream) noexcept nogil:
    if floating is float:
        if stream:
            run_normalize_stream_f32(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_f32(x, y, n, mean_hi, scale, shift)
    else:
        if stream:
            run_normalize_stream_f64(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_f64(x, y, n, mean_hi, scale, shift)


cdef inline void run_grad_sums(const floating* dy, const floating* x, Py_ssize_t n, double mean,
                               double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    if floating is float:
        run_grad_sums_f32(dy, x, n, mean, sum_dy, sum_dy_xmu)
    else:
        run_grad_sums_f64(dy, x, n, mean, sum_dy, sum_dy_xmu)


cdef inline void run_input_grad(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                floating k, floating a, floating mean_hi, floating b,
                                bint stream) noexcept nogil:
    if floating is float:
        if stream:
            run_input_grad_stream_f32(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_f32(dy, x, dx, n, k, a, mean_hi, b)
    else:
        if stream:
            run_input_grad_stream_f64(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_f64(dy, x, dx, n, k, a, mean_hi, b)


cdef inline void rows_mean_m2(const floating* x, Py_ssize_t rows, Py_ssize_t C, double* mean,
                              double* m2, double* scratch) noexcept nogil:
    # scratch: 2 * C doubles
    if floating is float:
        rows_mean_m2_f32(x, rows, C, mean, m2, scratch)
    else:
        rows_mean_m2_f64(x, rows, C, mean, m2, scratch)


cdef inline void rows_normalize(const floating* x, floating* y, Py_ssize_t rows, Py_ssize_t C,
                                const floating* mean_hi, const floating* scale,
                                const floating* shift, bint stream) noexcept nogil:
    if floating is float:
        if stream:
            rows_normalize_stream_f32(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_f32(x, y, rows, C, mean_hi, scale, shift)
    else:
        if stream:
            rows_normalize_stream_f64(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_f64(x, y, rows, C, mean_hi, scale, shift)


cdef inline void rows_grad_sums(const floating* dy, const floating* x, Py_ssize_t rows,
                                Py_ssize_t C, const double* mean, double* sum_dy,
                                double* sum_dy_xmu) noexcept nogil:
    if floating is float:
        rows_grad_sums_f32(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)
    else:
        rows_grad_sums_f64(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)


cdef inline void rows_input_grad(const floating* dy, const floating* x, floating* dx,
                                 Py_ssize_t rows, Py_ssize_t C, const floating* k,
                                 const floating* a, const floating* mean_hi,
                                 const floating* b, bint stream) noexcept nogil:
    if floating is float:
        if stream:
            rows_input_grad_stream_f32(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_f32(dy, x, dx, rows, C, k, a, mean_hi, b)
    else:
        if stream:
            rows_input_grad_stream_f64(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_f64(dy, x, dx, rows, C, k, a, mean_hi, b)


# ---------------------------------------------------------------- fused epilogue
# The normalization followed by a residual add (r != NULL) and/or a ReLU (relu), and the
# matching backward sums.  With neither, these are exactly run_normalize / rows_normalize,
# so callers need no separate unfused path.

cdef inline const floating* shifted(const floating* p, Py_ssize_t offset) noexcept nogil:
    # p + offset, keeping NULL (an absent optional array) NULL.
    if p == NULL:
        return NULL
    return p + offset


cdef inline void run_normalize_act(const floating* x, const floating* r, floating* y,
                                   Py_ssize_t n, floating mean_hi, floating scale,
                                   floating shift, bint relu, bint stream) noexcept nogil:
    if r == NULL and not relu:
        run_normalize(x, y, n, mean_hi, scale, shift, stream)
    elif floating is float:
        if stream:
            run_normalize_fused_stream_f32(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_f32(x, r, y, n, mean_hi, scale, shift, relu)
    else:
        if stream:
            run_normalize_fused_stream_f64(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_f64(x, r, y, n, mean_hi, scale, shift, relu)


cdef inline void rows_normalize_act(const floating* x, const floating* r, floating* y,
                                    Py_ssize_t rows, Py_ssize_t C, const floating* mean_hi,
                                    const floating* scale, const floating* shift, bint relu,
                                    bint stream) noexcept nogil:
    if r == NULL and not relu:
        rows_normalize(x, y, rows, C, mean_hi, scale, shift, stream)
    elif floating is float:
        if stream:
            rows_normalize_fused_stream_f32(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_f32(x, r, y, rows, C, mean_hi, scale, shift, relu)
    else:
        if stream:
            rows_normalize_fused_stream_f64(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_f64(x, r, y, rows, C, mean_hi, scale, shift, relu)


cdef inline void run_masked_grad_sums(const floating* dy, const floating* y, const floating* x,
                                      floating* g, Py_ssize_t n, double mean, double* sum_g,
                                      double* sum_g_xmu) noexcept nogil:
    if floating is float:
        run_masked_grad_sums_f32(dy, y, x, g, n, mean, sum_g, sum_g_xmu)
    else:
        run_masked_grad_sums_f64(dy, y, x, g, n, mean, sum_g, sum_g_xmu)


cdef inline void rows_masked_grad_sums(const floating* dy, const floating* y, const floating* x,
                                       floating* g, Py_ssize_t rows, Py_ssize_t C,
                                       const double* mean, double* sum_g,
                                       double* sum_g_xmu) noexcept nogil:
    if floating is float:
        rows_masked_grad_sums_f32(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
    else:
        rows_masked_grad_sums_f64(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
