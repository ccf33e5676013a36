# Declarations of the C loops in bn_loops.h, and fused-type wrappers so that the Cython
# kernels call one name for every data type (the branch is resolved at compile time).
# Two fused types: data_t, the storage type of the data arrays, and floating, the compute
# type of the per-channel constants: float with float, half and bfloat16 data, double with
# double data.  The wrappers taking both spell out the valid pairs; Cython still generates
# the other pairs, which do nothing, and the kernels' entry points never instantiate them.
# The output loops take `stream`: write with non-temporal stores (outputs larger than the
# caches; decided once per call by cpubn._dispatch).
from cython cimport floating

cdef extern from "bn_loops.h" nogil:
    # Half-precision storage types (bn_loops.h): distinct structs of 16 bits.
    ctypedef struct cpubn_half:
        unsigned short bits
    ctypedef struct cpubn_bfloat16:
        unsigned short bits

    # Each loop exists for float (_f32), double (_f64), half (_f16) and bfloat16 (_bf16)
    # data; per-channel constants are in the compute type (double for double data, float
    # otherwise).
    void run_mean_m2_f32(const float* x, Py_ssize_t n, double* mean, double* m2)
    void run_mean_m2_f64(const double* x, Py_ssize_t n, double* mean, double* m2)
    void run_mean_m2_f16(const cpubn_half* x, Py_ssize_t n, double* mean, double* m2)
    void run_mean_m2_bf16(const cpubn_bfloat16* x, Py_ssize_t n, double* mean, double* m2)
    void run_normalize_f32(const float* x, float* y, Py_ssize_t n, float mean_hi, float scale,
                           float shift)
    void run_normalize_f64(const double* x, double* y, Py_ssize_t n, double mean_hi,
                           double scale, double shift)
    void run_normalize_f16(const cpubn_half* x, cpubn_half* y, Py_ssize_t n, float mean_hi,
                           float scale, float shift)
    void run_normalize_bf16(const cpubn_bfloat16* x, cpubn_bfloat16* y, Py_ssize_t n,
                            float mean_hi, float scale, float shift)
    void run_grad_sums_f32(const float* dy, const float* x, Py_ssize_t n, double mean,
                           double* sum_dy, double* sum_dy_xmu)
    void run_grad_sums_f64(const double* dy, const double* x, Py_ssize_t n, double mean,
                           double* sum_dy, double* sum_dy_xmu)
    void run_grad_sums_f16(const cpubn_half* dy, const cpubn_half* x, Py_ssize_t n,
                           double mean, double* sum_dy, double* sum_dy_xmu)
    void run_grad_sums_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x, Py_ssize_t n,
                            double mean, double* sum_dy, double* sum_dy_xmu)
    void run_input_grad_f32(const float* dy, const float* x, float* dx, Py_ssize_t n, float k,
                            float a, float mean_hi, float b)
    void run_input_grad_f64(const double* dy, const double* x, double* dx, Py_ssize_t n,
                            double k, double a, double mean_hi, double b)
    void run_input_grad_f16(const cpubn_half* dy, const cpubn_half* x, cpubn_half* dx,
                            Py_ssize_t n, float k, float a, float mean_hi, float b)
    void run_input_grad_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x,
                             cpubn_bfloat16* dx, Py_ssize_t n, float k, float a,
                             float mean_hi, float b)
    void rows_mean_m2_f32(const float* x, Py_ssize_t rows, Py_ssize_t C, double* mean,
                          double* m2, double* scratch)
    void rows_mean_m2_f64(const double* x, Py_ssize_t rows, Py_ssize_t C, double* mean,
                          double* m2, double* scratch)
    void rows_mean_m2_f16(const cpubn_half* x, Py_ssize_t rows, Py_ssize_t C, double* mean,
                          double* m2, double* scratch)
    void rows_mean_m2_bf16(const cpubn_bfloat16* x, Py_ssize_t rows, Py_ssize_t C,
                           double* mean, double* m2, double* scratch)
    void rows_normalize_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t C,
                            const float* mean_hi, const float* scale, const float* shift)
    void rows_normalize_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean_hi, const double* scale, const double* shift)
    void rows_normalize_f16(const cpubn_half* x, cpubn_half* y, Py_ssize_t rows, Py_ssize_t C,
                            const float* mean_hi, const float* scale, const float* shift)
    void rows_normalize_bf16(const cpubn_bfloat16* x, cpubn_bfloat16* y, Py_ssize_t rows,
                             Py_ssize_t C, const float* mean_hi, const float* scale,
                             const float* shift)
    void rows_grad_sums_f32(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean, double* sum_dy, double* sum_dy_xmu)
    void rows_grad_sums_f64(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t C,
                            const double* mean, double* sum_dy, double* sum_dy_xmu)
    void rows_grad_sums_f16(const cpubn_half* dy, const cpubn_half* x, Py_ssize_t rows,
                            Py_ssize_t C, const double* mean, double* sum_dy,
                            double* sum_dy_xmu)
    void rows_grad_sums_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x,
                             Py_ssize_t rows, Py_ssize_t C, const double* mean,
                             double* sum_dy, double* sum_dy_xmu)
    void rows_input_grad_f32(const float* dy, const float* x, float* dx, Py_ssize_t rows,
                             Py_ssize_t C, const float* k, const float* a,
                             const float* mean_hi, const float* b)
    void rows_input_grad_f64(const double* dy, const double* x, double* dx, Py_ssize_t rows,
                             Py_ssize_t C, const double* k, const double* a,
                             const double* mean_hi, const double* b)
    void rows_input_grad_f16(const cpubn_half* dy, const cpubn_half* x, cpubn_half* dx,
                             Py_ssize_t rows, Py_ssize_t C, const float* k, const float* a,
                             const float* mean_hi, const float* b)
    void rows_input_grad_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x,
                              cpubn_bfloat16* dx, Py_ssize_t rows, Py_ssize_t C,
                              const float* k, const float* a, const float* mean_hi,
                              const float* b)
    void run_normalize_stream_f32(const float* x, float* y, Py_ssize_t n, float mean_hi,
                                  float scale, float shift)
    void run_normalize_stream_f64(const double* x, double* y, Py_ssize_t n, double mean_hi,
                                  double scale, double shift)
    void run_normalize_stream_f16(const cpubn_half* x, cpubn_half* y, Py_ssize_t n,
                                  float mean_hi, float scale, float shift)
    void run_normalize_stream_bf16(const cpubn_bfloat16* x, cpubn_bfloat16* y, Py_ssize_t n,
                                   float mean_hi, float scale, float shift)
    void run_input_grad_stream_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                                   float k, float a, float mean_hi, float b)
    void run_input_grad_stream_f64(const double* dy, const double* x, double* dx,
                                   Py_ssize_t n, double k, double a, double mean_hi, double b)
    void run_input_grad_stream_f16(const cpubn_half* dy, const cpubn_half* x, cpubn_half* dx,
                                   Py_ssize_t n, float k, float a, float mean_hi, float b)
    void run_input_grad_stream_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x,
                                    cpubn_bfloat16* dx, Py_ssize_t n, float k, float a,
                                    float mean_hi, float b)
    void rows_normalize_stream_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t C,
                                   const float* mean_hi, const float* scale,
                                   const float* shift)
    void rows_normalize_stream_f64(const double* x, double* y, Py_ssize_t rows, Py_ssize_t C,
                                   const double* mean_hi, const double* scale,
                                   const double* shift)
    void rows_normalize_stream_f16(const cpubn_half* x, cpubn_half* y, Py_ssize_t rows,
                                   Py_ssize_t C, const float* mean_hi, const float* scale,
                                   const float* shift)
    void rows_normalize_stream_bf16(const cpubn_bfloat16* x, cpubn_bfloat16* y,
                                    Py_ssize_t rows, Py_ssize_t C, const float* mean_hi,
                                    const float* scale, const float* shift)
    void rows_input_grad_stream_f32(const float* dy, const float* x, float* dx,
                                    Py_ssize_t rows, Py_ssize_t C, const float* k,
                                    const float* a, const float* mean_hi, const float* b)
    void rows_input_grad_stream_f64(const double* dy, const double* x, double* dx,
                                    Py_ssize_t rows, Py_ssize_t C, const double* k,
                                    const double* a, const double* mean_hi, const double* b)
    void rows_input_grad_stream_f16(const cpubn_half* dy, const cpubn_half* x, cpubn_half* dx,
                                    Py_ssize_t rows, Py_ssize_t C, const float* k,
                                    const float* a, const float* mean_hi, const float* b)
    void rows_input_grad_stream_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* x,
                                     cpubn_bfloat16* dx, Py_ssize_t rows, Py_ssize_t C,
                                     const float* k, const float* a, const float* mean_hi,
                                     const float* b)
    void run_normalize_fused_f32(const float* x, const float* r, float* y, Py_ssize_t n,
                                 float mean_hi, float scale, float shift, int relu)
    void run_normalize_fused_f64(const double* x, const double* r, double* y, Py_ssize_t n,
                                 double mean_hi, double scale, double shift, int relu)
    void run_normalize_fused_f16(const cpubn_half* x, const cpubn_half* r, cpubn_half* y,
                                 Py_ssize_t n, float mean_hi, float scale, float shift,
                                 int relu)
    void run_normalize_fused_bf16(const cpubn_bfloat16* x, const cpubn_bfloat16* r,
                                  cpubn_bfloat16* y, Py_ssize_t n, float mean_hi, float scale,
                                  float shift, int relu)
    void run_normalize_fused_stream_f32(const float* x, const float* r, float* y,
                                        Py_ssize_t n, float mean_hi, float scale, float shift,
                                        int relu)
    void run_normalize_fused_stream_f64(const double* x, const double* r, double* y,
                                        Py_ssize_t n, double mean_hi, double scale,
                                        double shift, int relu)
    void run_normalize_fused_stream_f16(const cpubn_half* x, const cpubn_half* r,
                                        cpubn_half* y, Py_ssize_t n, float mean_hi,
                                        float scale, float shift, int relu)
    void run_normalize_fused_stream_bf16(const cpubn_bfloat16* x, const cpubn_bfloat16* r,
                                         cpubn_bfloat16* y, Py_ssize_t n, float mean_hi,
                                         float scale, float shift, int relu)
    void rows_normalize_fused_f32(const float* x, const float* r, float* y, Py_ssize_t rows,
                                  Py_ssize_t C, const float* mean_hi, const float* scale,
                                  const float* shift, int relu)
    void rows_normalize_fused_f64(const double* x, const double* r, double* y,
                                  Py_ssize_t rows, Py_ssize_t C, const double* mean_hi,
                                  const double* scale, const double* shift, int relu)
    void rows_normalize_fused_f16(const cpubn_half* x, const cpubn_half* r, cpubn_half* y,
                                  Py_ssize_t rows, Py_ssize_t C, const float* mean_hi,
                                  const float* scale, const float* shift, int relu)
    void rows_normalize_fused_bf16(const cpubn_bfloat16* x, const cpubn_bfloat16* r,
                                   cpubn_bfloat16* y, Py_ssize_t rows, Py_ssize_t C,
                                   const float* mean_hi, const float* scale,
                                   const float* shift, int relu)
    void rows_normalize_fused_stream_f32(const float* x, const float* r, float* y,
                                         Py_ssize_t rows, Py_ssize_t C, const float* mean_hi,
                                         const float* scale, const float* shift, int relu)
    void rows_normalize_fused_stream_f64(const double* x, const double* r, double* y,
                                         Py_ssize_t rows, Py_ssize_t C, const double* mean_hi,
                                         const double* scale, const double* shift, int relu)
    void rows_normalize_fused_stream_f16(const cpubn_half* x, const cpubn_half* r,
                                         cpubn_half* y, Py_ssize_t rows, Py_ssize_t C,
                                         const float* mean_hi, const float* scale,
                                         const float* shift, int relu)
    void rows_normalize_fused_stream_bf16(const cpubn_bfloat16* x, const cpubn_bfloat16* r,
                                          cpubn_bfloat16* y, Py_ssize_t rows, Py_ssize_t C,
                                          const float* mean_hi, const float* scale,
                                          const float* shift, int relu)
    void run_masked_grad_sums_f32(const float* dy, const float* y, const float* x, float* g,
                                  Py_ssize_t n, double mean, double* sum_g, double* sum_g_xmu)
    void run_masked_grad_sums_f64(const double* dy, const double* y, const double* x,
                                  double* g, Py_ssize_t n, double mean, double* sum_g,
                                  double* sum_g_xmu)
    void run_masked_grad_sums_f16(const cpubn_half* dy, const cpubn_half* y,
                                  const cpubn_half* x, cpubn_half* g, Py_ssize_t n,
                                  double mean, double* sum_g, double* sum_g_xmu)
    void run_masked_grad_sums_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* y,
                                   const cpubn_bfloat16* x, cpubn_bfloat16* g, Py_ssize_t n,
                                   double mean, double* sum_g, double* sum_g_xmu)
    void rows_masked_grad_sums_f32(const float* dy, const float* y, const float* x, float* g,
                                   Py_ssize_t rows, Py_ssize_t C, const double* mean,
                                   double* sum_g, double* sum_g_xmu)
    void rows_masked_grad_sums_f64(const double* dy, const double* y, const double* x,
                                   double* g, Py_ssize_t rows, Py_ssize_t C,
                                   const double* mean, double* sum_g, double* sum_g_xmu)
    void rows_masked_grad_sums_f16(const cpubn_half* dy, const cpubn_half* y,
                                   const cpubn_half* x, cpubn_half* g, Py_ssize_t rows,
                                   Py_ssize_t C, const double* mean, double* sum_g,
                                   double* sum_g_xmu)
    void rows_masked_grad_sums_bf16(const cpubn_bfloat16* dy, const cpubn_bfloat16* y,
                                    const cpubn_bfloat16* x, cpubn_bfloat16* g,
                                    Py_ssize_t rows, Py_ssize_t C, const double* mean,
                                    double* sum_g, double* sum_g_xmu)
    const char* cpubn_half_conversions(int bfloat16)
    void combine_row_blocks(const double* means, const double* m2s, Py_ssize_t blocks,
                            Py_ssize_t C, Py_ssize_t rows, Py_ssize_t R, Py_ssize_t c0,
                            Py_ssize_t c1, double* mean, double* m2, double* dev)
    void chan_merge(double* count_a, double* mean_a, double* m2_a,
                    double count_b, double mean_b, double m2_b)


ctypedef fused data_t:
    float
    double
    cpubn_half
    cpubn_bfloat16


cdef inline void run_mean_m2(const data_t* x, Py_ssize_t n, double* mean, double* m2) noexcept nogil:
    if data_t is float:
        run_mean_m2_f32(x, n, mean, m2)
    elif data_t is double:
        run_mean_m2_f64(x, n, mean, m2)
    elif data_t is cpubn_half:
        run_mean_m2_f16(x, n, mean, m2)
    else:
        run_mean_m2_bf16(x, n, mean, m2)


cdef inline void run_normalize(const data_t* x, data_t* y, Py_ssize_t n, floating mean_hi,
                               floating scale, floating shift, bint stream) noexcept nogil:
    if data_t is float and floating is float:
        if stream:
            run_normalize_stream_f32(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_f32(x, y, n, mean_hi, scale, shift)
    elif data_t is double and floating is double:
        if stream:
            run_normalize_stream_f64(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_f64(x, y, n, mean_hi, scale, shift)
    elif data_t is cpubn_half and floating is float:
        if stream:
            run_normalize_stream_f16(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_f16(x, y, n, mean_hi, scale, shift)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            run_normalize_stream_bf16(x, y, n, mean_hi, scale, shift)
        else:
            run_normalize_bf16(x, y, n, mean_hi, scale, shift)


cdef inline void run_grad_sums(const data_t* dy, const data_t* x, Py_ssize_t n, double mean,
                               double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    if data_t is float:
        run_grad_sums_f32(dy, x, n, mean, sum_dy, sum_dy_xmu)
    elif data_t is double:
        run_grad_sums_f64(dy, x, n, mean, sum_dy, sum_dy_xmu)
    elif data_t is cpubn_half:
        run_grad_sums_f16(dy, x, n, mean, sum_dy, sum_dy_xmu)
    else:
        run_grad_sums_bf16(dy, x, n, mean, sum_dy, sum_dy_xmu)


cdef inline void run_input_grad(const data_t* dy, const data_t* x, data_t* dx, Py_ssize_t n,
                                floating k, floating a, floating mean_hi, floating b,
                                bint stream) noexcept nogil:
    if data_t is float and floating is float:
        if stream:
            run_input_grad_stream_f32(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_f32(dy, x, dx, n, k, a, mean_hi, b)
    elif data_t is double and floating is double:
        if stream:
            run_input_grad_stream_f64(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_f64(dy, x, dx, n, k, a, mean_hi, b)
    elif data_t is cpubn_half and floating is float:
        if stream:
            run_input_grad_stream_f16(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_f16(dy, x, dx, n, k, a, mean_hi, b)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            run_input_grad_stream_bf16(dy, x, dx, n, k, a, mean_hi, b)
        else:
            run_input_grad_bf16(dy, x, dx, n, k, a, mean_hi, b)


cdef inline void rows_mean_m2(const data_t* x, Py_ssize_t rows, Py_ssize_t C, double* mean,
                              double* m2, double* scratch) noexcept nogil:
    # scratch: 2 * C doubles
    if data_t is float:
        rows_mean_m2_f32(x, rows, C, mean, m2, scratch)
    elif data_t is double:
        rows_mean_m2_f64(x, rows, C, mean, m2, scratch)
    elif data_t is cpubn_half:
        rows_mean_m2_f16(x, rows, C, mean, m2, scratch)
    else:
        rows_mean_m2_bf16(x, rows, C, mean, m2, scratch)


cdef inline void rows_normalize(const data_t* x, data_t* y, Py_ssize_t rows, Py_ssize_t C,
                                const floating* mean_hi, const floating* scale,
                                const floating* shift, bint stream) noexcept nogil:
    if data_t is float and floating is float:
        if stream:
            rows_normalize_stream_f32(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_f32(x, y, rows, C, mean_hi, scale, shift)
    elif data_t is double and floating is double:
        if stream:
            rows_normalize_stream_f64(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_f64(x, y, rows, C, mean_hi, scale, shift)
    elif data_t is cpubn_half and floating is float:
        if stream:
            rows_normalize_stream_f16(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_f16(x, y, rows, C, mean_hi, scale, shift)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            rows_normalize_stream_bf16(x, y, rows, C, mean_hi, scale, shift)
        else:
            rows_normalize_bf16(x, y, rows, C, mean_hi, scale, shift)


cdef inline void rows_grad_sums(const data_t* dy, const data_t* x, Py_ssize_t rows,
                                Py_ssize_t C, const double* mean, double* sum_dy,
                                double* sum_dy_xmu) noexcept nogil:
    if data_t is float:
        rows_grad_sums_f32(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)
    elif data_t is double:
        rows_grad_sums_f64(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)
    elif data_t is cpubn_half:
        rows_grad_sums_f16(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)
    else:
        rows_grad_sums_bf16(dy, x, rows, C, mean, sum_dy, sum_dy_xmu)


cdef inline void rows_input_grad(const data_t* dy, const data_t* x, data_t* dx,
                                 Py_ssize_t rows, Py_ssize_t C, const floating* k,
                                 const floating* a, const floating* mean_hi,
                                 const floating* b, bint stream) noexcept nogil:
    if data_t is float and floating is float:
        if stream:
            rows_input_grad_stream_f32(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_f32(dy, x, dx, rows, C, k, a, mean_hi, b)
    elif data_t is double and floating is double:
        if stream:
            rows_input_grad_stream_f64(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_f64(dy, x, dx, rows, C, k, a, mean_hi, b)
    elif data_t is cpubn_half and floating is float:
        if stream:
            rows_input_grad_stream_f16(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_f16(dy, x, dx, rows, C, k, a, mean_hi, b)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            rows_input_grad_stream_bf16(dy, x, dx, rows, C, k, a, mean_hi, b)
        else:
            rows_input_grad_bf16(dy, x, dx, rows, C, k, a, mean_hi, b)


# ---------------------------------------------------------------- fused epilogue
# The normalization followed by a residual add (r != NULL) and/or a ReLU (relu), and the
# matching backward sums.  With neither, these are exactly run_normalize / rows_normalize,
# so callers need no separate unfused path.

cdef inline const data_t* shifted(const data_t* p, Py_ssize_t offset) noexcept nogil:
    # p + offset, keeping NULL (an absent optional array) NULL.
    if p == NULL:
        return NULL
    return p + offset


cdef inline void run_normalize_act(const data_t* x, const data_t* r, data_t* y,
                                   Py_ssize_t n, floating mean_hi, floating scale,
                                   floating shift, bint relu, bint stream) noexcept nogil:
    if r == NULL and not relu:
        run_normalize(x, y, n, mean_hi, scale, shift, stream)
    elif data_t is float and floating is float:
        if stream:
            run_normalize_fused_stream_f32(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_f32(x, r, y, n, mean_hi, scale, shift, relu)
    elif data_t is double and floating is double:
        if stream:
            run_normalize_fused_stream_f64(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_f64(x, r, y, n, mean_hi, scale, shift, relu)
    elif data_t is cpubn_half and floating is float:
        if stream:
            run_normalize_fused_stream_f16(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_f16(x, r, y, n, mean_hi, scale, shift, relu)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            run_normalize_fused_stream_bf16(x, r, y, n, mean_hi, scale, shift, relu)
        else:
            run_normalize_fused_bf16(x, r, y, n, mean_hi, scale, shift, relu)


cdef inline void rows_normalize_act(const data_t* x, const data_t* r, data_t* y,
                                    Py_ssize_t rows, Py_ssize_t C, const floating* mean_hi,
                                    const floating* scale, const floating* shift, bint relu,
                                    bint stream) noexcept nogil:
    if r == NULL and not relu:
        rows_normalize(x, y, rows, C, mean_hi, scale, shift, stream)
    elif data_t is float and floating is float:
        if stream:
            rows_normalize_fused_stream_f32(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_f32(x, r, y, rows, C, mean_hi, scale, shift, relu)
    elif data_t is double and floating is double:
        if stream:
            rows_normalize_fused_stream_f64(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_f64(x, r, y, rows, C, mean_hi, scale, shift, relu)
    elif data_t is cpubn_half and floating is float:
        if stream:
            rows_normalize_fused_stream_f16(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_f16(x, r, y, rows, C, mean_hi, scale, shift, relu)
    elif data_t is cpubn_bfloat16 and floating is float:
        if stream:
            rows_normalize_fused_stream_bf16(x, r, y, rows, C, mean_hi, scale, shift, relu)
        else:
            rows_normalize_fused_bf16(x, r, y, rows, C, mean_hi, scale, shift, relu)


cdef inline void run_masked_grad_sums(const data_t* dy, const data_t* y, const data_t* x,
                                      data_t* g, Py_ssize_t n, double mean, double* sum_g,
                                      double* sum_g_xmu) noexcept nogil:
    if data_t is float:
        run_masked_grad_sums_f32(dy, y, x, g, n, mean, sum_g, sum_g_xmu)
    elif data_t is double:
        run_masked_grad_sums_f64(dy, y, x, g, n, mean, sum_g, sum_g_xmu)
    elif data_t is cpubn_half:
        run_masked_grad_sums_f16(dy, y, x, g, n, mean, sum_g, sum_g_xmu)
    else:
        run_masked_grad_sums_bf16(dy, y, x, g, n, mean, sum_g, sum_g_xmu)


cdef inline void rows_masked_grad_sums(const data_t* dy, const data_t* y, const data_t* x,
                                       data_t* g, Py_ssize_t rows, Py_ssize_t C,
                                       const double* mean, double* sum_g,
                                       double* sum_g_xmu) noexcept nogil:
    if data_t is float:
        rows_masked_grad_sums_f32(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
    elif data_t is double:
        rows_masked_grad_sums_f64(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
    elif data_t is cpubn_half:
        rows_masked_grad_sums_f16(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
    else:
        rows_masked_grad_sums_bf16(dy, y, x, g, rows, C, mean, sum_g, sum_g_xmu)
