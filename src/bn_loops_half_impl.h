/* Templated body of bn_loops_half.h: the loops of bn_loops.h for one half-precision
 * storage type T (SUFFIX _f16 or _bf16), staged through float tiles.  Parameters:
 * TO_FLOAT / FROM_FLOAT (the portable scalar conversions), VECTOR_TARGET (the ISA of the
 * 8-wide conversions), LOAD8 / STORE8 (8 values of T <-> an __m256), SCALAR_TO_FLOAT /
 * SCALAR_FROM_FLOAT (one value, with that ISA: the vector loops' tails), VECTOR_OK
 * (whether this CPU has that ISA).  No include guard on purpose; the parameters are undefined at
 * the end. */

#define FN(name) CPUBN_CAT(name, SUFFIX)

CPUBN_CLONES static void FN(tile_to_float_portable)(const T *src, float *dst, ptrdiff_t n)
{
    CPUBN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = TO_FLOAT(src[i]);
}

CPUBN_CLONES static void FN(tile_from_float_portable)(const float *src, T *dst, ptrdiff_t n)
{
    CPUBN_SIMD
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = FROM_FLOAT(src[i]);
}

#ifdef CPUBN_HALF_VECTORS
__attribute__((target(VECTOR_TARGET)))
static void FN(tile_to_float_vector)(const T *src, float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LOAD8(src + i));
    for (; i < n; i++) dst[i] = SCALAR_TO_FLOAT(src[i]);
}

__attribute__((target(VECTOR_TARGET)))
static void FN(tile_from_float_vector)(const float *src, T *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) STORE8(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = SCALAR_FROM_FLOAT(src[i]);
}
#endif

static void FN(tile_to_float)(const T *src, float *dst, ptrdiff_t n)
{
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(tile_to_float_vector)(src, dst, n);
        return;
    }
#endif
    FN(tile_to_float_portable)(src, dst, n);
}

static void FN(tile_from_float)(const float *src, T *dst, ptrdiff_t n)
{
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(tile_from_float_vector)(src, dst, n);
        return;
    }
#endif
    FN(tile_from_float_portable)(src, dst, n);
}

/* A float tile (n <= CPUBN_HALF_TILE) rounded to T and back: the value an unfused
 * sequence would store. */
static void FN(round_tile)(float *values, ptrdiff_t n)
{
    T rounded[CPUBN_HALF_TILE];
    FN(tile_from_float)(values, rounded, n);
    FN(tile_to_float)(rounded, values, n);
}

/* The fused epilogue on a normalized float tile v (n <= CPUBN_HALF_TILE): + r (rounded as
 * the unfused sequence rounds: bn(x) to T, then the sum to T), then the ReLU; see
 * run_normalize_fused_f32. */
CPUBN_CLONES static void FN(fused_epilogue_tile)(float *v, const T *r, ptrdiff_t n, int relu)
{
    if (r != NULL) {
        float residual[CPUBN_HALF_TILE];
        FN(round_tile)(v, n);
        FN(tile_to_float)(r, residual, n);
        for (ptrdiff_t i = 0; i < n; i++) v[i] = v[i] + residual[i];
        if (relu) FN(round_tile)(v, n);
    }
    if (relu)
        for (ptrdiff_t i = 0; i < n; i++) v[i] = v[i] < 0 ? 0.0f : v[i];
}

/* The element-wise loops that only read and write data (normalization, input gradient)
 * are also written directly with the vector conversions, in one pass with no tiles: they
 * are the memory-bound part, where the tiles' extra L1 traffic would cost the most.  The
 * same float operations in the same order as the float32 loops (no FMA): the same bits. */
#ifdef CPUBN_HALF_VECTORS
__attribute__((target(VECTOR_TARGET)))
static void FN(run_normalize_vector)(const T *x, T *y, ptrdiff_t n, float mean_hi, float scale,
                                     float shift)
{
    __m256 m = _mm256_set1_ps(mean_hi), s = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        STORE8(y + i, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(LOAD8(x + i), m), s), b));
    for (; i < n; i++)
        y[i] = SCALAR_FROM_FLOAT((SCALAR_TO_FLOAT(x[i]) - mean_hi) * scale + shift);
}

__attribute__((target(VECTOR_TARGET)))
static void FN(run_input_grad_vector)(const T *dy, const T *x, T *dx, ptrdiff_t n, float k,
                                      float a, float mean_hi, float b)
{
    __m256 vk = _mm256_set1_ps(k), va = _mm256_set1_ps(a), vm = _mm256_set1_ps(mean_hi);
    __m256 vb = _mm256_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 grad = _mm256_mul_ps(LOAD8(dy + i), vk);
        __m256 centred = _mm256_mul_ps(_mm256_sub_ps(LOAD8(x + i), vm), va);
        STORE8(dx + i, _mm256_add_ps(_mm256_add_ps(grad, centred), vb));
    }
    for (; i < n; i++)
        dx[i] = SCALAR_FROM_FLOAT(SCALAR_TO_FLOAT(dy[i]) * k
                                  + (SCALAR_TO_FLOAT(x[i]) - mean_hi) * a + b);
}

__attribute__((target(VECTOR_TARGET)))
static void FN(rows_normalize_vector)(const T *x, T *y, ptrdiff_t rows, ptrdiff_t C,
                                      const float *mean_hi, const float *scale,
                                      const float *shift)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *xr = x + r * C;
        T *yr = y + r * C;
        ptrdiff_t c = 0;
        for (; c + 8 <= C; c += 8) {
            __m256 v = _mm256_sub_ps(LOAD8(xr + c), _mm256_loadu_ps(mean_hi + c));
            STORE8(yr + c, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(scale + c)),
                                         _mm256_loadu_ps(shift + c)));
        }
        for (; c < C; c++)
            yr[c] = SCALAR_FROM_FLOAT((SCALAR_TO_FLOAT(xr[c]) - mean_hi[c]) * scale[c]
                                      + shift[c]);
    }
}

__attribute__((target(VECTOR_TARGET)))
static void FN(rows_input_grad_vector)(const T *dy, const T *x, T *dx, ptrdiff_t rows,
                                       ptrdiff_t C, const float *k, const float *a,
                                       const float *mean_hi, const float *b)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *gr = dy + r * C, *xr = x + r * C;
        T *dxr = dx + r * C;
        ptrdiff_t c = 0;
        for (; c + 8 <= C; c += 8) {
            __m256 grad = _mm256_mul_ps(LOAD8(gr + c), _mm256_loadu_ps(k + c));
            __m256 centred = _mm256_mul_ps(
                _mm256_sub_ps(LOAD8(xr + c), _mm256_loadu_ps(mean_hi + c)),
                _mm256_loadu_ps(a + c));
            STORE8(dxr + c, _mm256_add_ps(_mm256_add_ps(grad, centred), _mm256_loadu_ps(b + c)));
        }
        for (; c < C; c++)
            dxr[c] = SCALAR_FROM_FLOAT(SCALAR_TO_FLOAT(gr[c]) * k[c]
                                       + (SCALAR_TO_FLOAT(xr[c]) - mean_hi[c]) * a[c] + b[c]);
    }
}
#endif

/* ---------------------------------------------------------------- runs (channels-first) */

/* Runs are reduced in tiles of CPUBN_HALF_RUN_TILE, the kernels' RUN_CHUNK: every run they
 * pass is a single tile, i.e. one call of the float32 loop, so the result is bitwise that
 * of float32 data holding the same values.  (Longer runs would be merged tile by tile.) */
static void FN(run_mean_m2)(const T *x, ptrdiff_t n, double *mean_out, double *m2_out)
{
    float tile[CPUBN_HALF_RUN_TILE];
    double count = 0.0, mean = 0.0, m2 = 0.0, part_mean, part_m2;
    if (n <= CPUBN_HALF_RUN_TILE) {         /* every run the kernels pass */
        FN(tile_to_float)(x, tile, n);
        run_mean_m2_f32(tile, n, mean_out, m2_out);
        return;
    }
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_RUN_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_RUN_TILE ? n - i : CPUBN_HALF_RUN_TILE;
        FN(tile_to_float)(x + i, tile, len);
        run_mean_m2_f32(tile, len, &part_mean, &part_m2);
        chan_merge(&count, &mean, &m2, (double)len, part_mean, part_m2);
    }
    *mean_out = mean;
    *m2_out = m2;
}

static void FN(run_normalize)(const T *x, T *y, ptrdiff_t n,
                              float mean_hi, float scale, float shift)
{
    float in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(run_normalize_vector)(x, y, n, mean_hi, scale, shift);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_TILE ? n - i : CPUBN_HALF_TILE;
        FN(tile_to_float)(x + i, in, len);
        run_normalize_f32(in, out, len, mean_hi, scale, shift);
        FN(tile_from_float)(out, y + i, len);
    }
}

static void FN(run_grad_sums)(const T *dy, const T *x, ptrdiff_t n,
                              double mean, double *sum_dy_out, double *sum_dy_xmu_out)
{
    float grad[CPUBN_HALF_RUN_TILE], in[CPUBN_HALF_RUN_TILE];
    double sum_dy = 0.0, sum_dy_xmu = 0.0, part_dy, part_dy_xmu;
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_RUN_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_RUN_TILE ? n - i : CPUBN_HALF_RUN_TILE;
        FN(tile_to_float)(dy + i, grad, len);
        FN(tile_to_float)(x + i, in, len);
        run_grad_sums_f32(grad, in, len, mean, &part_dy, &part_dy_xmu);
        sum_dy += part_dy;
        sum_dy_xmu += part_dy_xmu;
    }
    *sum_dy_out = sum_dy;
    *sum_dy_xmu_out = sum_dy_xmu;
}

/* dx may be dy itself: each tile of dy is read before that tile of dx is written. */
static void FN(run_input_grad)(const T *dy, const T *x, T *dx,
                               ptrdiff_t n, float k, float a, float mean_hi, float b)
{
    float grad[CPUBN_HALF_TILE], in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(run_input_grad_vector)(dy, x, dx, n, k, a, mean_hi, b);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_TILE ? n - i : CPUBN_HALF_TILE;
        FN(tile_to_float)(dy + i, grad, len);
        FN(tile_to_float)(x + i, in, len);
        run_input_grad_f32(grad, in, out, len, k, a, mean_hi, b);
        FN(tile_from_float)(out, dx + i, len);
    }
}

static void FN(run_normalize_fused)(const T *x, const T *r, T *y,
                                    ptrdiff_t n, float mean_hi, float scale, float shift,
                                    int relu)
{
    float in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_TILE ? n - i : CPUBN_HALF_TILE;
        FN(tile_to_float)(x + i, in, len);
        run_normalize_f32(in, out, len, mean_hi, scale, shift);
        FN(fused_epilogue_tile)(out, r == NULL ? NULL : r + i, len, relu);
        FN(tile_from_float)(out, y + i, len);
    }
}

/* g = (y <= 0 ? 0 : dy) (or dy when y == NULL) stored to g_out, and its sums with x, as in
 * run_masked_grad_sums_f32; g_out may be dy itself (read first, tile by tile). */
CPUBN_CLONES static void FN(masked_grad_tile)(const T *dy, const T *y, T *g_out,
                             float *g, ptrdiff_t n)
{
    FN(tile_to_float)(dy, g, n);
    if (y != NULL) {
        /* n may be a reduction tile (CPUBN_HALF_RUN_TILE): y is converted in pieces. */
        float mask_source[CPUBN_HALF_TILE];
        for (ptrdiff_t i0 = 0; i0 < n; i0 += CPUBN_HALF_TILE) {
            ptrdiff_t len = n - i0 < CPUBN_HALF_TILE ? n - i0 : CPUBN_HALF_TILE;
            FN(tile_to_float)(y + i0, mask_source, len);
            for (ptrdiff_t i = 0; i < len; i++)
                g[i0 + i] = mask_source[i] <= 0 ? 0.0f : g[i0 + i];
        }
    }
    FN(tile_from_float)(g, g_out, n);
}

static void FN(run_masked_grad_sums)(const T *dy, const T *y,
                                     const T *x, T *g_out, ptrdiff_t n,
                                     double mean, double *sum_g_out, double *sum_g_xmu_out)
{
    float g[CPUBN_HALF_RUN_TILE], in[CPUBN_HALF_RUN_TILE];
    double sum_g = 0.0, sum_g_xmu = 0.0, part_g, part_g_xmu;
    for (ptrdiff_t i = 0; i < n; i += CPUBN_HALF_RUN_TILE) {
        ptrdiff_t len = n - i < CPUBN_HALF_RUN_TILE ? n - i : CPUBN_HALF_RUN_TILE;
        FN(masked_grad_tile)(dy + i, y == NULL ? NULL : y + i, g_out + i, g, len);
        FN(tile_to_float)(x + i, in, len);
        run_grad_sums_f32(g, in, len, mean, &part_g, &part_g_xmu);
        sum_g += part_g;
        sum_g_xmu += part_g_xmu;
    }
    *sum_g_out = sum_g;
    *sum_g_xmu_out = sum_g_xmu;
}

/* ---------------------------------------------------------------- rows (channels-last) */

/* Tiles of a (rows, C) block: `tile_rows` whole rows when C fits a tile, else pieces of
 * one row `tile_width` channels wide.  Either way a tile is contiguous. */
#define FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width)                                \
    for (ptrdiff_t r = 0, step_ = (C) <= CPUBN_HALF_TILE ? CPUBN_HALF_TILE / (C) : 1;       \
         r < (rows); r += step_)                                                          \
        for (ptrdiff_t c0 = 0, tile_rows = (rows) - r < step_ ? (rows) - r : step_,         \
                       width = (C) < CPUBN_HALF_TILE ? (C) : CPUBN_HALF_TILE;               \
             c0 < (C);                                                                    \
             c0 += width, width = (C) - c0 < CPUBN_HALF_TILE ? (C) - c0 : CPUBN_HALF_TILE)

/* rows_mean_m2_f32's algorithm streamed over converted tiles: the same float group sums
 * of CPUBN_GROUP rows, flushed into double at the same rows, whatever the tiles, so the
 * result is bitwise that of float32 data.  (Statistics of each tile merged afterwards
 * would cost a merge per channel per tile: with wide layers, tiles of one or two rows.)
 * scratch: 2 * C doubles, used as there (group sums: 2 * C floats, pivots: C floats). */
CPUBN_CLONES static void FN(rows_mean_m2)(const T *x, ptrdiff_t rows, ptrdiff_t C, double *mean,
                             double *m2, double *scratch)
{
    float tile[CPUBN_HALF_TILE];
    float *group = (float *)scratch;          /* pass 1: sums; pass 2: deviations, squares */
    float *pivot = group + 2 * C;
    for (ptrdiff_t c = 0; c < C; c++) { mean[c] = 0.0; m2[c] = 0.0; }
    for (int pass = 0; pass < 2; pass++) {
        FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width) {
            float *sum = group + c0, *sq = group + C + c0;
            const float *center = pivot + c0;
            FN(tile_to_float)(x + r * C + c0, tile, tile_rows * width);
            for (ptrdiff_t i = 0; i < tile_rows; i++) {
                const float *row = tile + i * width;
                ptrdiff_t index = r + i;
                if (index % CPUBN_GROUP == 0)
                    for (ptrdiff_t c = 0; c < width; c++) { sum[c] = 0.0f; sq[c] = 0.0f; }
                if (pass == 0) {
                    CPUBN_SIMD
                    for (ptrdiff_t c = 0; c < width; c++) sum[c] += row[c];
                } else {
                    CPUBN_SIMD
                    for (ptrdiff_t c = 0; c < width; c++) {
                        float d = row[c] - center[c];
                        sum[c] += d;
                        sq[c] += d * d;
                    }
                }
                if ((index + 1) % CPUBN_GROUP == 0 || index == rows - 1) {
                    CPUBN_SIMD
                    for (ptrdiff_t c = 0; c < width; c++) {
                        mean[c0 + c] += (double)sum[c];
                        m2[c0 + c] += (double)sq[c];     /* pass 1: adds zeros */
                    }
                }
            }
        }
        if (pass == 0)      /* from here on mean[] accumulates the deviations from the pivots */
            for (ptrdiff_t c = 0; c < C; c++) {
                pivot[c] = (float)(mean[c] / (double)rows);
                mean[c] = 0.0;
                m2[c] = 0.0;
            }
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        double dev = mean[c];
        /* With +-inf in the data the deviations are NaN: keep the (infinite) pivot. */
        mean[c] = dev - dev == 0.0 ? (double)pivot[c] + dev / (double)rows : (double)pivot[c];
        m2[c] -= dev * dev / (double)rows;
    }
}

static void FN(rows_normalize)(const T *x, T *y, ptrdiff_t rows,
                               ptrdiff_t C, const float *mean_hi, const float *scale,
                               const float *shift)
{
    float in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(rows_normalize_vector)(x, y, rows, C, mean_hi, scale, shift);
        return;
    }
#endif
    FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width) {
        ptrdiff_t offset = r * C + c0, len = tile_rows * width;
        FN(tile_to_float)(x + offset, in, len);
        rows_normalize_f32(in, out, tile_rows, width, mean_hi + c0, scale + c0, shift + c0);
        FN(tile_from_float)(out, y + offset, len);
    }
}

static void FN(rows_grad_sums)(const T *dy, const T *x, ptrdiff_t rows,
                               ptrdiff_t C, const double *mean, double *sum_dy,
                               double *sum_dy_xmu)
{
    float grad[CPUBN_HALF_TILE], in[CPUBN_HALF_TILE];
    for (ptrdiff_t c = 0; c < C; c++) { sum_dy[c] = 0.0; sum_dy_xmu[c] = 0.0; }
    FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width) {
        ptrdiff_t offset = r * C + c0, len = tile_rows * width;
        FN(tile_to_float)(dy + offset, grad, len);
        FN(tile_to_float)(x + offset, in, len);
        rows_grad_sums_add_f32(grad, in, tile_rows, width, mean + c0, sum_dy + c0,
                               sum_dy_xmu + c0);
    }
}

static void FN(rows_input_grad)(const T *dy, const T *x, T *dx,
                                ptrdiff_t rows, ptrdiff_t C, const float *k, const float *a,
                                const float *mean_hi, const float *b)
{
    float grad[CPUBN_HALF_TILE], in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
#ifdef CPUBN_HALF_VECTORS
    if (VECTOR_OK) {
        FN(rows_input_grad_vector)(dy, x, dx, rows, C, k, a, mean_hi, b);
        return;
    }
#endif
    FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width) {
        ptrdiff_t offset = r * C + c0, len = tile_rows * width;
        FN(tile_to_float)(dy + offset, grad, len);
        FN(tile_to_float)(x + offset, in, len);
        rows_input_grad_f32(grad, in, out, tile_rows, width, k + c0, a + c0, mean_hi + c0,
                            b + c0);
        FN(tile_from_float)(out, dx + offset, len);
    }
}

static void FN(rows_normalize_fused)(const T *x, const T *r, T *y,
                                     ptrdiff_t rows, ptrdiff_t C, const float *mean_hi,
                                     const float *scale, const float *shift, int relu)
{
    float in[CPUBN_HALF_TILE], out[CPUBN_HALF_TILE];
    FOR_EACH_ROW_TILE(rows, C, row, c0, tile_rows, width) {
        ptrdiff_t offset = row * C + c0, len = tile_rows * width;
        FN(tile_to_float)(x + offset, in, len);
        rows_normalize_f32(in, out, tile_rows, width, mean_hi + c0, scale + c0, shift + c0);
        FN(fused_epilogue_tile)(out, r == NULL ? NULL : r + offset, len, relu);
        FN(tile_from_float)(out, y + offset, len);
    }
}

static void FN(rows_masked_grad_sums)(const T *dy, const T *y,
                                      const T *x, T *g_out, ptrdiff_t rows,
                                      ptrdiff_t C, const double *mean, double *sum_g,
                                      double *sum_g_xmu)
{
    float g[CPUBN_HALF_TILE], in[CPUBN_HALF_TILE];
    for (ptrdiff_t c = 0; c < C; c++) { sum_g[c] = 0.0; sum_g_xmu[c] = 0.0; }
    FOR_EACH_ROW_TILE(rows, C, r, c0, tile_rows, width) {
        ptrdiff_t offset = r * C + c0, len = tile_rows * width;
        FN(masked_grad_tile)(dy + offset, y == NULL ? NULL : y + offset, g_out + offset, g, len);
        FN(tile_to_float)(x + offset, in, len);
        rows_grad_sums_add_f32(g, in, tile_rows, width, mean + c0, sum_g + c0,
                               sum_g_xmu + c0);
    }
}

#undef FOR_EACH_ROW_TILE

/* ---------------------------------------------------------------- streaming variants */

static void FN(run_normalize_stream)(const T *x, T *y, ptrdiff_t n,
                                     float mean_hi, float scale, float shift)
{
    FN(run_normalize)(x, y, n, mean_hi, scale, shift);
}

static void FN(run_input_grad_stream)(const T *dy, const T *x,
                                      T *dx, ptrdiff_t n, float k, float a,
                                      float mean_hi, float b)
{
    FN(run_input_grad)(dy, x, dx, n, k, a, mean_hi, b);
}

static void FN(rows_normalize_stream)(const T *x, T *y, ptrdiff_t rows,
                                      ptrdiff_t C, const float *mean_hi, const float *scale,
                                      const float *shift)
{
    FN(rows_normalize)(x, y, rows, C, mean_hi, scale, shift);
}

static void FN(rows_input_grad_stream)(const T *dy, const T *x,
                                       T *dx, ptrdiff_t rows, ptrdiff_t C,
                                       const float *k, const float *a, const float *mean_hi,
                                       const float *b)
{
    FN(rows_input_grad)(dy, x, dx, rows, C, k, a, mean_hi, b);
}

static void FN(run_normalize_fused_stream)(const T *x, const T *r,
                                           T *y, ptrdiff_t n, float mean_hi,
                                           float scale, float shift, int relu)
{
    FN(run_normalize_fused)(x, r, y, n, mean_hi, scale, shift, relu);
}

static void FN(rows_normalize_fused_stream)(const T *x, const T *r,
                                            T *y, ptrdiff_t rows, ptrdiff_t C,
                                            const float *mean_hi, const float *scale,
                                            const float *shift, int relu)
{
    FN(rows_normalize_fused)(x, r, y, rows, C, mean_hi, scale, shift, relu);
}

#undef FN
#undef T
#undef SUFFIX
#undef TO_FLOAT
#undef FROM_FLOAT
#undef VECTOR_TARGET
#undef LOAD8
#undef STORE8
#undef SCALAR_TO_FLOAT
#undef SCALAR_FROM_FLOAT
#undef VECTOR_OK
