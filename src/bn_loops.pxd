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
                          double* dev)
    void rows_mean_m2_f64(const double* x, Py_ssize_t rows, Py_ssize_t C, double* mean, double* m2,
                          double* dev)
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
                              double* m2, double* dev) noexcept nogil:
    if floating is float:
        rows_mean_m2_f32(x, rows, C, mean, m2, dev)
    else:
        rows_mean_m2_f64(x, rows, C, mean, m2, dev)


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
