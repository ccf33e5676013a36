/* Templated body of bn_loops.h: included once with T=float, SUFFIX=_f32 and once with
 * T=double, SUFFIX=_f64.  No include guard on purpose. */

#define FN(name) CPUBN_CAT(name, SUFFIX)

/* Sum of `lanes` accumulators (a power of two) in a fixed pairwise order. */
CPUBN_INLINE double FN(lanes_total)(const double *acc, int lanes)
{
    double partial[CPUBN_LANES];
    for (int j = 0; j < lanes; j++) partial[j] = acc[j];
    for (int width = lanes / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) partial[j] += partial[j + width];
    return partial[0];
}

/* Mean and sum of squared deviations (m2) of x[0:n], n >= 1, with `lanes` independent
 * accumulators (a literal at each call site, so each instance is specialized).  Two
 * passes: the second re-reads the run from cache, and subtracting the mean first keeps
 * m2 exact for data with a large offset, where E[x^2] - E[x]^2 would cancel.  The second
 * pass also sums the deviations, which corrects the rounding error of the first mean
 * (the "corrected two-pass" algorithm): a constant run gets its value back exactly. */
CPUBN_INLINE void FN(mean_m2_lanes)(const T *CPUBN_RESTRICT x, ptrdiff_t n, int lanes,
                                     double *mean_out, double *m2_out)
{
    double acc[CPUBN_LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + lanes <= n; i += lanes) {
        CPUBN_SIMD
        for (int j = 0; j < lanes; j++) acc[j] += (double)x[i + j];
    }
    double tail = 0.0;
    for (; i < n; i++) tail += (double)x[i];
    double mean = (FN(lanes_total)(acc, lanes) + tail) / (double)n;

    double dev[CPUBN_LANES] = {0};
    double sq[CPUBN_LANES] = {0};
    i = 0;
    for (; i + lanes <= n; i += lanes) {
        CPUBN_SIMD
        for (int j = 0; j < lanes; j++) {
            double d = (double)x[i + j] - mean;
            dev[j] += d;
            sq[j] += d * d;
        }
    }
    double dev_tail = 0.0, sq_tail = 0.0;
    for (; i < n; i++) {
        double d = (double)x[i] - mean;
        dev_tail += d;
        sq_tail += d * d;
    }
    double dev_total = FN(lanes_total)(dev, lanes) + dev_tail;
    /* With +-inf in the data the deviations are NaN: keep the (infinite) first mean. */
    *mean_out = dev_total - dev_total == 0.0 ? mean + dev_total / (double)n : mean;
    *m2_out = FN(lanes_total)(sq, lanes) + sq_tail - dev_total * dev_total / (double)n;
}

/* Short runs (small feature maps such as 7x7) would spend more time folding 32
 * accumulators than adding their elements: they use 8.  The choice depends on the run
 * length alone, i.e. on the shape, never on the thread count. */
#define CPUBN_SHORT_RUN 256

#if CPUBN_FLOAT_DATA
/* The same corrected two-pass statistics for float data, at a third of the arithmetic:
 * groups of CPUBN_GROUP iterations accumulate in float (16 lanes per AVX-512 register and
 * no conversions), and each group's sums are then added into double accumulators.  A
 * group sums 8 values per lane, so its rounding error is a few float ulps of that group
 * sum; the deviations are taken from `pivot`, the first-pass mean rounded to float, which
 * makes them exact for data near its mean (Sterbenz) however large the offset, and the
 * mean is pivot + sum(deviations) / n in double.  A constant run still gets its value
 * back exactly, and m2 exactly 0. */
#define CPUBN_GROUP 8
CPUBN_INLINE void FN(mean_m2_grouped)(const float *CPUBN_RESTRICT x, ptrdiff_t n,
                                      double *mean_out, double *m2_out)
{
    double acc[CPUBN_LANES] = {0};
    ptrdiff_t i = 0;
    while (i + CPUBN_LANES <= n) {
        float group[CPUBN_LANES] = {0};
        for (int it = 0; it < CPUBN_GROUP && i + CPUBN_LANES <= n; it++, i += CPUBN_LANES) {
            CPUBN_SIMD
            for (int j = 0; j < CPUBN_LANES; j++) group[j] += x[i + j];
        }
        CPUBN_SIMD
        for (int j = 0; j < CPUBN_LANES; j++) acc[j] += (double)group[j];
    }
    double tail = 0.0;
    for (; i < n; i++) tail += (double)x[i];
    double mean = (FN(lanes_total)(acc, CPUBN_LANES) + tail) / (double)n;
    float pivot = (float)mean;

    double dev[CPUBN_LANES] = {0};
    double sq[CPUBN_LANES] = {0};
    i = 0;
    while (i + CPUBN_LANES <= n) {
        float group_dev[CPUBN_LANES] = {0};
        float group_sq[CPUBN_LANES] = {0};
        for (int it = 0; it < CPUBN_GROUP && i + CPUBN_LANES <= n; it++, i += CPUBN_LANES) {
            CPUBN_SIMD
            for (int j = 0; j < CPUBN_LANES; j++) {
                float d = x[i + j] - pivot;
                group_dev[j] += d;
                group_sq[j] += d * d;
            }
        }
        CPUBN_SIMD
        for (int j = 0; j < CPUBN_LANES; j++) {
            dev[j] += (double)group_dev[j];
            sq[j] += (double)group_sq[j];
        }
    }
    double dev_tail = 0.0, sq_tail = 0.0;
    for (; i < n; i++) {
        double d = (double)x[i] - (double)pivot;
        dev_tail += d;
        sq_tail += d * d;
    }
    double dev_total = FN(lanes_total)(dev, CPUBN_LANES) + dev_tail;
    /* With +-inf in the data the deviations are NaN: keep the (infinite) first mean. */
    *mean_out = dev_total - dev_total == 0.0 ? (double)pivot + dev_total / (double)n : mean;
    *m2_out = FN(lanes_total)(sq, CPUBN_LANES) + sq_tail - dev_total * dev_total / (double)n;
}
#endif

CPUBN_CLONES static void FN(run_mean_m2)(const T *CPUBN_RESTRICT x, ptrdiff_t n,
                                         double *mean_out, double *m2_out)
{
    if (n < CPUBN_SHORT_RUN)
        FN(mean_m2_lanes)(x, n, 8, mean_out, m2_out);
    else
#if CPUBN_FLOAT_DATA
        FN(mean_m2_grouped)(x, n, mean_out, m2_out);
#else
        FN(mean_m2_lanes)(x, n, CPUBN_LANES, mean_out, m2_out);
#endif
}

/* y = (x - mean_hi) * scale + shift.  For float, mean_hi is the float nearest the double
 * mean and shift carries the remainder (see channel constants in _forward.pyx), so the
 * subtraction is exact for data near its mean however large the offset. */
CPUBN_CLONES static void FN(run_normalize)(const T *CPUBN_RESTRICT x, T *CPUBN_RESTRICT y,
                                           ptrdiff_t n, T mean_hi, T scale, T shift)
{
    CPUBN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) y[i] = (x[i] - mean_hi) * scale + shift;
}

/* sum(dy) and sum(dy * (x - mean)) over a run, accumulated in double with `lanes`
 * accumulators (8 for short runs, as in run_mean_m2). */
CPUBN_INLINE void FN(grad_sums_lanes)(const T *CPUBN_RESTRICT dy, const T *CPUBN_RESTRICT x,
                                       ptrdiff_t n, double mean, int lanes,
                                       double *sum_dy_out, double *sum_dy_xmu_out)
{
    double acc_dy[CPUBN_LANES] = {0};
    double acc_dy_xmu[CPUBN_LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + lanes <= n; i += lanes) {
        CPUBN_SIMD
        for (int j = 0; j < lanes; j++) {
            double g = (double)dy[i + j];
            acc_dy[j] += g;
            acc_dy_xmu[j] += g * ((double)x[i + j] - mean);
        }
    }
    double tail_dy = 0.0, tail_dy_xmu = 0.0;
    for (; i < n; i++) {
        double g = (double)dy[i];
        tail_dy += g;
        tail_dy_xmu += g * ((double)x[i] - mean);
    }
    *sum_dy_out = FN(lanes_total)(acc_dy, lanes) + tail_dy;
    *sum_dy_xmu_out = FN(lanes_total)(acc_dy_xmu, lanes) + tail_dy_xmu;
}

#if CPUBN_FLOAT_DATA
/* Float data: the gradient sums in groups of CPUBN_GROUP float iterations, added into
 * double accumulators, as mean_m2_grouped does for the statistics.  Products are taken
 * against pivot = mean rounded to float (x - pivot is exact near the mean), and
 * sum(dy * (x - mean)) = sum(dy * (x - pivot)) - (mean - pivot) * sum(dy) in double. */
CPUBN_INLINE void FN(grad_sums_grouped)(const float *CPUBN_RESTRICT dy,
                                        const float *CPUBN_RESTRICT x, ptrdiff_t n,
                                        double mean, double *sum_dy_out,
                                        double *sum_dy_xmu_out)
{
    float pivot = (float)mean;
    double acc_dy[CPUBN_LANES] = {0};
    double acc_dy_xmu[CPUBN_LANES] = {0};
    ptrdiff_t i = 0;
    while (i + CPUBN_LANES <= n) {
        float group_dy[CPUBN_LANES] = {0};
        float group_dy_xmu[CPUBN_LANES] = {0};
        for (int it = 0; it < CPUBN_GROUP && i + CPUBN_LANES <= n; it++, i += CPUBN_LANES) {
            CPUBN_SIMD
            for (int j = 0; j < CPUBN_LANES; j++) {
                float g = dy[i + j];
                group_dy[j] += g;
                group_dy_xmu[j] += g * (x[i + j] - pivot);
            }
        }
        CPUBN_SIMD
        for (int j = 0; j < CPUBN_LANES; j++) {
            acc_dy[j] += (double)group_dy[j];
            acc_dy_xmu[j] += (double)group_dy_xmu[j];
        }
    }
    double tail_dy = 0.0, tail_dy_xmu = 0.0;
    for (; i < n; i++) {
        double g = (double)dy[i];
        tail_dy += g;
        tail_dy_xmu += g * ((double)x[i] - (double)pivot);
    }
    double sum_dy = FN(lanes_total)(acc_dy, CPUBN_LANES) + tail_dy;
    double sum_dy_pivot = FN(lanes_total)(acc_dy_xmu, CPUBN_LANES) + tail_dy_xmu;
    *sum_dy_out = sum_dy;
    *sum_dy_xmu_out = sum_dy_pivot - (mean - (double)pivot) * sum_dy;
}
#endif

CPUBN_CLONES static void FN(run_grad_sums)(const T *CPUBN_RESTRICT dy, const T *CPUBN_RESTRICT x,
                                           ptrdiff_t n, double mean,
                                           double *sum_dy_out, double *sum_dy_xmu_out)
{
    if (n < CPUBN_SHORT_RUN)
        FN(grad_sums_lanes)(dy, x, n, mean, 8, sum_dy_out, sum_dy_xmu_out);
    else
#if CPUBN_FLOAT_DATA
        FN(grad_sums_grouped)(dy, x, n, mean, sum_dy_out, sum_dy_xmu_out);
#else
        FN(grad_sums_lanes)(dy, x, n, mean, CPUBN_LANES, sum_dy_out, sum_dy_xmu_out);
#endif
}

/* dx = dy * k + (x - mean_hi) * a + b: the training-mode input gradient with all
 * per-channel terms folded into three constants. */
CPUBN_CLONES static void FN(run_input_grad)(const T *CPUBN_RESTRICT dy, const T *CPUBN_RESTRICT x,
                                            T *CPUBN_RESTRICT dx, ptrdiff_t n,
                                            T k, T a, T mean_hi, T b)
{
    CPUBN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) dx[i] = dy[i] * k + (x[i] - mean_hi) * a + b;
}

/* Per-channel mean and m2 of a block x[0:rows, 0:C] (row-major), corrected two-pass like
 * run_mean_m2; the channel loop is the vector loop.  scratch: 2 * C doubles of caller
 * scratch.  Float data sums groups of CPUBN_GROUP rows in float first, like
 * mean_m2_grouped, with deviations taken from per-channel float pivots. */
CPUBN_CLONES static void FN(rows_mean_m2)(const T *CPUBN_RESTRICT x, ptrdiff_t rows, ptrdiff_t C,
                                          double *CPUBN_RESTRICT mean, double *CPUBN_RESTRICT m2,
                                          double *CPUBN_RESTRICT scratch)
{
#if CPUBN_FLOAT_DATA
    float *group = (float *)scratch;            /* group sums: C floats (pass 2: 2 * C) */
    float *pivot = group + 2 * C;               /* C floats */
    for (ptrdiff_t c = 0; c < C; c++) { mean[c] = 0.0; m2[c] = 0.0; }
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += CPUBN_GROUP) {
        ptrdiff_t r1 = rows - r0 < CPUBN_GROUP ? rows : r0 + CPUBN_GROUP;
        for (ptrdiff_t c = 0; c < C; c++) group[c] = 0.0f;
        for (ptrdiff_t r = r0; r < r1; r++) {
            const T *row = x + r * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) group[c] += row[c];
        }
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) mean[c] += (double)group[c];
    }
    /* From here on mean[] accumulates the deviations from the pivots. */
    for (ptrdiff_t c = 0; c < C; c++) { pivot[c] = (float)(mean[c] / (double)rows); mean[c] = 0.0; }
    float *group_dev = group, *group_sq = group + C;
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += CPUBN_GROUP) {
        ptrdiff_t r1 = rows - r0 < CPUBN_GROUP ? rows : r0 + CPUBN_GROUP;
        for (ptrdiff_t c = 0; c < C; c++) { group_dev[c] = 0.0f; group_sq[c] = 0.0f; }
        for (ptrdiff_t r = r0; r < r1; r++) {
            const T *row = x + r * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) {
                float d = row[c] - pivot[c];
                group_dev[c] += d;
                group_sq[c] += d * d;
            }
        }
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) {
            mean[c] += (double)group_dev[c];
            m2[c] += (double)group_sq[c];
        }
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        double dev = mean[c];
        /* With +-inf in the data the deviations are NaN: keep the (infinite) pivot. */
        mean[c] = dev - dev == 0.0 ? (double)pivot[c] + dev / (double)rows : (double)pivot[c];
        m2[c] -= dev * dev / (double)rows;
    }
#else
    double *dev = scratch;
    for (ptrdiff_t c = 0; c < C; c++) { mean[c] = 0.0; m2[c] = 0.0; dev[c] = 0.0; }
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *row = x + r * C;
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) mean[c] += (double)row[c];
    }
    double inv_rows = 1.0 / (double)rows;
    for (ptrdiff_t c = 0; c < C; c++) mean[c] /= (double)rows;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *row = x + r * C;
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) {
            double d = (double)row[c] - mean[c];
            dev[c] += d;
            m2[c] += d * d;
        }
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        if (dev[c] - dev[c] == 0.0) mean[c] += dev[c] * inv_rows;   /* finite: correct */
        m2[c] -= dev[c] * dev[c] * inv_rows;
    }
#endif
}

CPUBN_CLONES static void FN(rows_normalize)(const T *CPUBN_RESTRICT x, T *CPUBN_RESTRICT y,
                                            ptrdiff_t rows, ptrdiff_t C,
                                            const T *CPUBN_RESTRICT mean_hi,
                                            const T *CPUBN_RESTRICT scale,
                                            const T *CPUBN_RESTRICT shift)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *xr = x + r * C;
        T *yr = y + r * C;
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) yr[c] = (xr[c] - mean_hi[c]) * scale[c] + shift[c];
    }
}

/* Adds the per-channel sum(dy) and sum(dy * (x - mean)) of a block of rows to the sums
 * (row by row: the half-precision loops add tile after tile and get the same bits). */
CPUBN_CLONES static void FN(rows_grad_sums_add)(const T *CPUBN_RESTRICT dy,
                                                const T *CPUBN_RESTRICT x, ptrdiff_t rows,
                                                ptrdiff_t C, const double *CPUBN_RESTRICT mean,
                                                double *CPUBN_RESTRICT sum_dy,
                                                double *CPUBN_RESTRICT sum_dy_xmu)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *gr = dy + r * C;
        const T *xr = x + r * C;
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) {
            double g = (double)gr[c];
            sum_dy[c] += g;
            sum_dy_xmu[c] += g * ((double)xr[c] - mean[c]);
        }
    }
}

/* Per-channel sum(dy) and sum(dy * (x - mean)) of a block of rows (overwrites the sums). */
static void FN(rows_grad_sums)(const T *dy, const T *x, ptrdiff_t rows, ptrdiff_t C,
                               const double *mean, double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c = 0; c < C; c++) { sum_dy[c] = 0.0; sum_dy_xmu[c] = 0.0; }
    FN(rows_grad_sums_add)(dy, x, rows, C, mean, sum_dy, sum_dy_xmu);
}

CPUBN_CLONES static void FN(rows_input_grad)(const T *CPUBN_RESTRICT dy, const T *CPUBN_RESTRICT x,
                                             T *CPUBN_RESTRICT dx, ptrdiff_t rows, ptrdiff_t C,
                                             const T *CPUBN_RESTRICT k, const T *CPUBN_RESTRICT a,
                                             const T *CPUBN_RESTRICT mean_hi,
                                             const T *CPUBN_RESTRICT b)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *gr = dy + r * C;
        const T *xr = x + r * C;
        T *dxr = dx + r * C;
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++)
            dxr[c] = gr[c] * k[c] + (xr[c] - mean_hi[c]) * a[c] + b[c];
    }
}

/* Fused epilogues of the normalization: y = act((x - mean_hi) * scale + shift + r), with a
 * residual add when r != NULL and a ReLU when relu != 0.  The normalized value is rounded
 * to T before the add, and the ReLU is `v < 0 ? 0 : v` (NaN propagates as in np.maximum,
 * relu(0) = 0), so the result is bitwise the unfused sequence bn(x) + r, then
 * np.maximum(., 0).  One loop per variant: the branch is taken once per call.  The plain
 * normalization (no r, no ReLU) is run_normalize itself. */
CPUBN_CLONES static void FN(run_normalize_fused)(const T *CPUBN_RESTRICT x,
                                                 const T *CPUBN_RESTRICT r,
                                                 T *CPUBN_RESTRICT y, ptrdiff_t n,
                                                 T mean_hi, T scale, T shift, int relu)
{
    if (r == NULL) {
        CPUBN_SIMD
        for (ptrdiff_t i = 0; i < n; i++) {
            T v = (x[i] - mean_hi) * scale + shift;
            y[i] = v < 0 ? (T)0 : v;
        }
    } else if (!relu) {
        CPUBN_SIMD
        for (ptrdiff_t i = 0; i < n; i++) {
            T v = (x[i] - mean_hi) * scale + shift;
            y[i] = v + r[i];
        }
    } else {
        CPUBN_SIMD
        for (ptrdiff_t i = 0; i < n; i++) {
            T v = (x[i] - mean_hi) * scale + shift;
            v = v + r[i];
            y[i] = v < 0 ? (T)0 : v;
        }
    }
}

CPUBN_CLONES static void FN(rows_normalize_fused)(const T *CPUBN_RESTRICT x,
                                                  const T *CPUBN_RESTRICT r,
                                                  T *CPUBN_RESTRICT y, ptrdiff_t rows,
                                                  ptrdiff_t C, const T *CPUBN_RESTRICT mean_hi,
                                                  const T *CPUBN_RESTRICT scale,
                                                  const T *CPUBN_RESTRICT shift, int relu)
{
    if (r == NULL) {
        for (ptrdiff_t row = 0; row < rows; row++) {
            const T *xr = x + row * C;
            T *yr = y + row * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) {
                T v = (xr[c] - mean_hi[c]) * scale[c] + shift[c];
                yr[c] = v < 0 ? (T)0 : v;
            }
        }
    } else if (!relu) {
        for (ptrdiff_t row = 0; row < rows; row++) {
            const T *xr = x + row * C;
            const T *rr = r + row * C;
            T *yr = y + row * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) {
                T v = (xr[c] - mean_hi[c]) * scale[c] + shift[c];
                yr[c] = v + rr[c];
            }
        }
    } else {
        for (ptrdiff_t row = 0; row < rows; row++) {
            const T *xr = x + row * C;
            const T *rr = r + row * C;
            T *yr = y + row * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) {
                T v = (xr[c] - mean_hi[c]) * scale[c] + shift[c];
                v = v + rr[c];
                yr[c] = v < 0 ? (T)0 : v;
            }
        }
    }
}

/* The backward of the fused epilogue, folded into the gradient sums: g = (y <= 0 ? 0 : dy)
 * (y is the forward's output, whose sign is the ReLU mask: y == 0 gives 0 as in PyTorch's
 * threshold_backward, NaN passes the gradient), or g = dy when y == NULL (residual add
 * without ReLU).  g is stored to g_out (dresidual, or the dx buffer that the input-gradient
 * loop then reads back from cache) and then summed by run_grad_sums itself, so the sums
 * are bitwise those of cpubn's BN backward applied to the masked gradient.  g_out may be
 * dy itself (dx written over dy): each element is read before it is written, so dy and
 * g_out are not restrict. */
CPUBN_INLINE void FN(masked_grad_sums)(const T *dy, const T *CPUBN_RESTRICT y,
                                        const T *CPUBN_RESTRICT x, T *g_out,
                                        ptrdiff_t n, double mean,
                                        double *sum_g_out, double *sum_g_xmu_out)
{
    if (y != NULL) {
        CPUBN_SIMD
        for (ptrdiff_t k = 0; k < n; k++) {
            T d = dy[k];                        /* loaded unconditionally: a select */
            g_out[k] = y[k] <= 0 ? (T)0 : d;
        }
    } else if (g_out != dy) {
        CPUBN_SIMD
        for (ptrdiff_t k = 0; k < n; k++) g_out[k] = dy[k];
    }
    FN(run_grad_sums)(g_out, x, n, mean, sum_g_out, sum_g_xmu_out);
}

/* Same lane count as run_grad_sums for the same run length, so the sums (and dx) are
 * bitwise those of the unfused sequence. */
CPUBN_CLONES static void FN(run_masked_grad_sums)(const T *dy, const T *CPUBN_RESTRICT y,
                                                  const T *CPUBN_RESTRICT x, T *g_out,
                                                  ptrdiff_t n, double mean,
                                                  double *sum_g_out, double *sum_g_xmu_out)
{
    FN(masked_grad_sums)(dy, y, x, g_out, n, mean, sum_g_out, sum_g_xmu_out);
}

/* Per-channel form of run_masked_grad_sums for a block of rows (overwrites the sums). */
CPUBN_CLONES static void FN(rows_masked_grad_sums)(const T *dy, const T *CPUBN_RESTRICT y,
                                                   const T *CPUBN_RESTRICT x, T *g_out,
                                                   ptrdiff_t rows, ptrdiff_t C,
                                                   const double *CPUBN_RESTRICT mean,
                                                   double *CPUBN_RESTRICT sum_g,
                                                   double *CPUBN_RESTRICT sum_g_xmu)
{
    for (ptrdiff_t c = 0; c < C; c++) { sum_g[c] = 0.0; sum_g_xmu[c] = 0.0; }
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *gr = dy + r * C;
        const T *xr = x + r * C;
        T *outr = g_out + r * C;
        if (y != NULL) {                        /* a row of g, then its sums (see above) */
            const T *yr = y + r * C;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) {
                T d = gr[c];
                outr[c] = yr[c] <= 0 ? (T)0 : d;
            }
        } else {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < C; c++) outr[c] = gr[c];
        }
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) {
            double g = (double)outr[c];
            sum_g[c] += g;
            sum_g_xmu[c] += g * ((double)xr[c] - mean[c]);
        }
    }
}

/* Streaming-store versions of the output loops: the same arithmetic (so the same bits),
 * computed into a stack buffer in L1, then written with non-temporal stores. */
#define STREAM_ELEMS ((ptrdiff_t)(CPUBN_STREAM_BUFFER / sizeof(T)))
/* Runs shorter than this (e.g. 7x7 maps) are written with ordinary stores: each streaming
 * copy ends with a store fence, which costs more than it saves on a few hundred bytes. */
#define CPUBN_STREAM_MIN_RUN ((ptrdiff_t)(4096 / sizeof(T)))

static void FN(run_normalize_stream)(const T *x, T *y, ptrdiff_t n, T mean_hi, T scale, T shift)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    if (n < CPUBN_STREAM_MIN_RUN) {
        FN(run_normalize)(x, y, n, mean_hi, scale, shift);
        return;
    }
    for (ptrdiff_t i = 0; i < n; i += STREAM_ELEMS) {
        ptrdiff_t len = n - i < STREAM_ELEMS ? n - i : STREAM_ELEMS;
        FN(run_normalize)(x + i, buffer, len, mean_hi, scale, shift);
        cpubn_stream_copy(y + i, buffer, (size_t)len * sizeof(T));
    }
}

static void FN(run_input_grad_stream)(const T *dy, const T *x, T *dx, ptrdiff_t n,
                                      T k, T a, T mean_hi, T b)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    if (n < CPUBN_STREAM_MIN_RUN) {
        FN(run_input_grad)(dy, x, dx, n, k, a, mean_hi, b);
        return;
    }
    for (ptrdiff_t i = 0; i < n; i += STREAM_ELEMS) {
        ptrdiff_t len = n - i < STREAM_ELEMS ? n - i : STREAM_ELEMS;
        FN(run_input_grad)(dy + i, x + i, buffer, len, k, a, mean_hi, b);
        cpubn_stream_copy(dx + i, buffer, (size_t)len * sizeof(T));
    }
}

/* Rows are processed a buffer's worth at a time; a row longer than the buffer is written
 * with ordinary stores. */
static void FN(rows_normalize_stream)(const T *x, T *y, ptrdiff_t rows, ptrdiff_t C,
                                      const T *mean_hi, const T *scale, const T *shift)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    ptrdiff_t step = STREAM_ELEMS / C;
    if (step == 0) {
        FN(rows_normalize)(x, y, rows, C, mean_hi, scale, shift);
        return;
    }
    for (ptrdiff_t r = 0; r < rows; r += step) {
        ptrdiff_t len = rows - r < step ? rows - r : step;
        FN(rows_normalize)(x + r * C, buffer, len, C, mean_hi, scale, shift);
        cpubn_stream_copy(y + r * C, buffer, (size_t)(len * C) * sizeof(T));
    }
}

static void FN(rows_input_grad_stream)(const T *dy, const T *x, T *dx, ptrdiff_t rows,
                                       ptrdiff_t C, const T *k, const T *a, const T *mean_hi,
                                       const T *b)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    ptrdiff_t step = STREAM_ELEMS / C;
    if (step == 0) {
        FN(rows_input_grad)(dy, x, dx, rows, C, k, a, mean_hi, b);
        return;
    }
    for (ptrdiff_t r = 0; r < rows; r += step) {
        ptrdiff_t len = rows - r < step ? rows - r : step;
        FN(rows_input_grad)(dy + r * C, x + r * C, buffer, len, C, k, a, mean_hi, b);
        cpubn_stream_copy(dx + r * C, buffer, (size_t)(len * C) * sizeof(T));
    }
}

static void FN(run_normalize_fused_stream)(const T *x, const T *r, T *y, ptrdiff_t n,
                                           T mean_hi, T scale, T shift, int relu)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    if (n < CPUBN_STREAM_MIN_RUN) {
        FN(run_normalize_fused)(x, r, y, n, mean_hi, scale, shift, relu);
        return;
    }
    for (ptrdiff_t i = 0; i < n; i += STREAM_ELEMS) {
        ptrdiff_t len = n - i < STREAM_ELEMS ? n - i : STREAM_ELEMS;
        FN(run_normalize_fused)(x + i, r == NULL ? NULL : r + i, buffer, len, mean_hi, scale,
                                shift, relu);
        cpubn_stream_copy(y + i, buffer, (size_t)len * sizeof(T));
    }
}

static void FN(rows_normalize_fused_stream)(const T *x, const T *r, T *y, ptrdiff_t rows,
                                            ptrdiff_t C, const T *mean_hi, const T *scale,
                                            const T *shift, int relu)
{
    T buffer[CPUBN_STREAM_BUFFER / sizeof(T)];
    ptrdiff_t step = STREAM_ELEMS / C;
    if (step == 0) {
        FN(rows_normalize_fused)(x, r, y, rows, C, mean_hi, scale, shift, relu);
        return;
    }
    for (ptrdiff_t row = 0; row < rows; row += step) {
        ptrdiff_t len = rows - row < step ? rows - row : step;
        FN(rows_normalize_fused)(x + row * C, r == NULL ? NULL : r + row * C, buffer, len, C,
                                 mean_hi, scale, shift, relu);
        cpubn_stream_copy(y + row * C, buffer, (size_t)(len * C) * sizeof(T));
    }
}

#undef STREAM_ELEMS
#undef CPUBN_STREAM_MIN_RUN
#undef FN
