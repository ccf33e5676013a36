/* Innermost loops of the cpubn kernels, for float (suffix _f32), double (_f64), IEEE half
 * (_f16: NumPy's float16) and bfloat16 (_bf16: ml_dtypes.bfloat16).
 *
 * Why C and not Cython: the reductions need several independent vector accumulators and
 * `#pragma omp simd`, which Cython cannot express, and each loop is compiled for AVX-512,
 * AVX2 and baseline x86-64 and picked at load time (function multiversioning), so a
 * portable wheel still runs at full vector width.  The loops are written so that every
 * clone performs the same floating-point operations in the same order: results do not
 * depend on the instruction set (the build also disables FMA contraction).
 *
 * Generated from one table: loops_table.py lists the data types and the loops that
 * the Cython kernels call; setup.py renders loops_float.h.tp (float32 and float64
 * data), loops_half.h.tp (float16 and bfloat16) and loops.pxd.tp (the Cython
 * declarations and fused-type dispatchers) from it.  Every instance's name is spelled
 * out in the generated files (run_mean_m2_f32, ..., run_mean_m2_bf16).
 *
 * Two layouts, two families:
 *   run_*  : one contiguous run of one channel (channels-first: x[n, c, 0:S]).
 *   rows_* : a block of rows of a (rows, C) matrix, per-channel work vectorized over C
 *            (channels-last).
 * All reductions accumulate in double.  Half precision is computed in float, with float
 * per-channel constants, and rounded once when stored (PyTorch's "mixed type").
 */
#ifndef CPUBN_BN_LOOPS_H
#define CPUBN_BN_LOOPS_H

#include <math.h>
#include <stddef.h>

#include "simd_dispatch.h"     /* CPUBN_CLONES */

#if defined(_MSC_VER)
#define CPUBN_RESTRICT __restrict
#define CPUBN_INLINE static __forceinline
#else
#define CPUBN_RESTRICT __restrict__
/* Helpers must be inlined into each multiversioned caller: a separate copy would be
 * compiled for baseline x86-64 only and run the hot loops without AVX. */
#define CPUBN_INLINE static inline __attribute__((always_inline))
#endif

#if defined(_OPENMP)
#define CPUBN_SIMD _Pragma("omp simd")
#else
#define CPUBN_SIMD
#endif

/* Independent accumulators per reduction: enough to hide the add latency at AVX-512 width. */
#define CPUBN_LANES 32

/* Streaming (non-temporal) stores: outputs larger than the caches are written around them,
 * which saves the read-for-ownership of every output line.  SSE2 is part of x86-64, so
 * no run-time dispatch is needed; elsewhere the copy is a plain memcpy. */
#include <string.h>
#include <stdint.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
static inline void cpubn_stream_copy(void *dst, const void *src, size_t bytes)
{
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    d += head; s += head; bytes -= head;
    for (; bytes >= 16; bytes -= 16, d += 16, s += 16)
        _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
    memcpy(d, s, bytes);
    _mm_sfence();   /* order the weakly-ordered stores before the caller's later writes */
}
#else
static inline void cpubn_stream_copy(void *dst, const void *src, size_t bytes)
{
    memcpy(dst, src, bytes);
}
#endif

/* Bytes computed into an L1-resident buffer (the thread's `work`) before each streaming
 * copy; runs shorter than CPUBN_STREAM_MIN_BYTES are written with ordinary stores. */
#define CPUBN_STREAM_BUFFER 8192
#define CPUBN_STREAM_MIN_BYTES 4096

/* Short runs (small feature maps such as 7x7) would spend more time folding 32
 * accumulators than adding their elements: they use 8.  The choice depends on the run
 * length alone, i.e. on the shape, never on the thread count. */
#define CPUBN_SHORT_RUN 256

/* Float data sums groups of this many iterations (rows) in float before double. */
#define CPUBN_GROUP 8

/* The channels-last element-wise loops (normalization, input gradient) read a few
 * per-channel constants for every row.  When those constants pass CPUBN_ROW_CONSTANTS_L1
 * bytes (C > 1365 for the normalization's three float arrays, C > 1024 for the input
 * gradient's four) they no longer stay in L1 beside the rows streaming through, and
 * every row reloads them from L2; the loops then take CPUBN_ROW_QUAD rows per pass over
 * the channels, loading each constant once for four rows.  Below the threshold one row
 * per pass stays faster (four interleaved rows cost more than the reloads they save).
 * Each element's arithmetic is the same either way, so are the bits. */
#define CPUBN_ROW_CONSTANTS_L1 16384
#define CPUBN_ROW_QUAD 4

CPUBN_INLINE int rows_by_quads(int constants, ptrdiff_t C, size_t itemsize)
{
    return (size_t)constants * (size_t)C * itemsize > CPUBN_ROW_CONSTANTS_L1;
}

/* The channels-last statistics walk a block of rows in tiles of this many channels, so
 * that a tile's accumulators stay in vector registers across the rows (two AVX-512
 * registers of floats, four of doubles).  A loop over whole rows loads and stores every
 * accumulator once per row, which runs at a fraction of the speed of a plain read.
 * Tiling keeps each channel's additions in the same order, hence the same bits.  The
 * float gradient sums (rows_grad_sums) walk the same tiles. */
#define CPUBN_ROW_TILE 32

/* Half-precision tiles, in values: element-wise loops and channels-last reductions use
 * CPUBN_HALF_TILE; channels-first reductions a whole chunk of a run, the kernels'
 * RUN_CHUNK (partition.pxd takes it from here), so that a chunk is one call of the float32
 * loop and its result is bitwise that of float32 data. */
#define CPUBN_HALF_TILE 2048
#define CPUBN_RUN_CHUNK 16384
#define CPUBN_HALF_RUN_TILE CPUBN_RUN_CHUNK

/* Channels-first runs of at most this many values take the slab loops (loops_slab.h),
 * a block of at most CPUBN_SLAB_MAX_WIDTH channels per call (partition.pxd: slab_*). */
#define CPUBN_SLAB_MAX_RUN 1024
#define CPUBN_SLAB_MAX_WIDTH 64
/* A slab takes about this many contiguous values of each batch item (a "piece": width
 * channels of S values; at most this many, as S <= CPUBN_SLAB_MAX_RUN gives width >= 4). */
#define CPUBN_SLAB_PIECE 4096

/* Per-thread scratch of the loops (`float *work`), in floats: what the largest user,
 * run_masked_grad_sums of half-precision data, takes (two reduction tiles and a mask
 * tile).  The kernels allocate it on the heap for each thread before a parallel region
 * (cpubn_work_floats() tells them the size): worker threads' stacks stay small. */
#define CPUBN_WORK_FLOATS (2 * CPUBN_HALF_RUN_TILE + CPUBN_HALF_TILE)

static inline ptrdiff_t cpubn_work_floats(void) { return CPUBN_WORK_FLOATS; }

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(CPUBN_STREAM_BUFFER <= CPUBN_WORK_FLOATS * sizeof(float),
               "the streaming buffer lives in the thread's work");
_Static_assert(4 * CPUBN_HALF_TILE <= CPUBN_WORK_FLOATS,
               "element-wise half loops take up to four tiles of work");
#endif

/* Half-precision storage.  Structs rather than bare uint16_t so that the two formats are
 * distinct types (the Cython layer dispatches on them) and never mistaken for integers. */
typedef struct { uint16_t bits; } cpubn_half;
typedef struct { uint16_t bits; } cpubn_bfloat16;

CPUBN_INLINE float cpubn_float_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

CPUBN_INLINE uint32_t cpubn_bits_from_float(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* The portable conversions (half_convert.h uses F16C / AVX2 where the CPU has them, and
 * these elsewhere and for loop tails): integer bit manipulation with selects instead of
 * branches, so that they vectorize.  Loads are exact; stores round to nearest, ties to
 * even, like NumPy's astype(float16), ml_dtypes and the hardware conversions: the same
 * bits on every CPU. */
CPUBN_INLINE float cpubn_half_to_float(cpubn_half h)
{
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exponent = h.bits & 0x7c00u;
    uint32_t magnitude = (uint32_t)(h.bits & 0x7fffu) << 13;  /* fields at float positions */
    /* Normal numbers: rebias the exponent from 15 to 127.  Inf and NaN: all-ones exponent
     * in both formats (the mantissa, i.e. the NaN payload, is kept). */
    uint32_t normal = magnitude + (112u << 23);
    uint32_t special = magnitude + (224u << 23);
    /* Zero and subnormals, m * 2^-24: give the mantissa the exponent of 2^-14, which makes
     * the float 2^-14 + m * 2^-24, and subtract 2^-14 (exact). */
    uint32_t subnormal = cpubn_bits_from_float(cpubn_float_from_bits(magnitude + (113u << 23))
                                               - cpubn_float_from_bits(113u << 23));
    /* Selected with masks, not ?:, so the float subtraction stays unconditional: GCC
     * will not vectorize a float operation it had to make conditional. */
    uint32_t is_subnormal = 0u - (uint32_t)(exponent == 0);
    uint32_t is_special = 0u - (uint32_t)(exponent == 0x7c00u);
    uint32_t is_normal = ~(is_subnormal | is_special);
    return cpubn_float_from_bits((subnormal & is_subnormal) | (special & is_special)
                                 | (normal & is_normal) | sign);
}

CPUBN_INLINE cpubn_half cpubn_half_from_float(float f)
{
    uint32_t u = cpubn_bits_from_float(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    /* Normal range: rebias the exponent and round away the low 13 mantissa bits to nearest
     * even; a carry out of the mantissa bumps the exponent, as it should. */
    uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    /* Below 2^-14 (half subnormals): in 0.5 + |f| the float's own rounding leaves |f| to a
     * multiple of 2^-24, i.e. the subnormal mantissa, in the low bits (1024 = 2^-14 is the
     * smallest normal's encoding, also right).  Masks again keep the addition unconditional. */
    uint32_t subnormal = cpubn_bits_from_float(cpubn_float_from_bits(a) + 0.5f) - 0x3f000000u;
    uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);                /* quiet, payload kept */
    uint32_t is_subnormal = 0u - (uint32_t)(a < 0x38800000u);
    uint32_t is_overflow = 0u - (uint32_t)(a >= 0x477ff000u);    /* >= 65520, inf, NaN */
    uint32_t is_nan = 0u - (uint32_t)(a > 0x7f800000u);
    uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
    uint32_t bits = (finite & ~is_overflow) | (0x7c00u & is_overflow & ~is_nan) | (nan & is_nan);
    cpubn_half h = {(uint16_t)(bits | sign)};
    return h;
}

CPUBN_INLINE float cpubn_bfloat16_to_float(cpubn_bfloat16 b)
{
    return cpubn_float_from_bits((uint32_t)b.bits << 16);   /* bfloat16: a float's top half */
}

CPUBN_INLINE cpubn_bfloat16 cpubn_bfloat16_from_float(float f)
{
    uint32_t u = cpubn_bits_from_float(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* nearest even; overflow: inf */
    uint32_t nan = (u >> 16) | 0x0040u;                         /* quiet, sign kept */
    cpubn_bfloat16 b = {(uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
    return b;
}

/* Called by the generated dispatchers of loops.pxd in the fused-type pairings that
 * have no loops (e.g. half-precision data with double constants), which no kernel should
 * ever use.  In an optimized GCC build a call that survives dead-code elimination is a
 * compile-time error; elsewhere it aborts, loudly, rather than do nothing. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__OPTIMIZE__)
extern void cpubn_invalid_type_pair(void)
    __attribute__((error("cpubn: a kernel uses a data / compute type pair that has no loops")));
#else
#include <stdio.h>
#include <stdlib.h>
static void cpubn_invalid_type_pair(void)
{
    fputs("cpubn: a kernel used a data / compute type pair that has no loops\n", stderr);
    abort();
}
#endif

/* The grouped-pivot sums: the one summation that every reduction of float data shares
 * (the float32 loops' mean_m2_grouped, grad_sums_grouped and rows_mean_m2, and the
 * half-precision rows_mean_m2, which must give the float32 bits).  `n` rows of `width`
 * float columns (row r at a + r * stride; grouped_pivot_sums: stride = width), all within
 * one group of at most CPUBN_GROUP rows, are summed per column in float into the group
 * sums `sum` and `sq`, which `first` starts afresh and `last` adds into the double
 * accumulators `acc` and `acc_sq` after:
 *   CPUBN_SUM_VALUES      sum += a                     (sq, acc_sq, pivot, b unused)
 *   CPUBN_SUM_DEVIATIONS  d = a - pivot; sum += d; sq += d * d             (b unused)
 *   CPUBN_SUM_GRADIENTS   sum += a; sq += a * (b - pivot)            (a: dy, b: x)
 * A group's float sum of 8 values per column errs by a few float ulps of that sum; the
 * pivots (per column: the first-pass mean rounded to float) make the deviations exact
 * near the mean however large the offset (Sterbenz).  Callers cut groups at the same
 * rows whatever else they do, so one that passes a group in pieces (the half-precision
 * loop, as its tiles cut the rows) gets the bits of one that passes it whole.  `kind`
 * is a literal at every call site: the helper is inlined and specialized. */
enum { CPUBN_SUM_VALUES, CPUBN_SUM_DEVIATIONS, CPUBN_SUM_GRADIENTS };

CPUBN_INLINE void grouped_pivot_sums_at(int kind, const float *a, const float *b,
                                        ptrdiff_t stride, ptrdiff_t n, ptrdiff_t width,
                                        const float *pivot, int first, int last, float *sum,
                                        float *sq, double *acc, double *acc_sq)
{
    ptrdiff_t r = 0;
    if (first && n > 0) {
        /* The group's first row starts the sums.  A reset to zero and an add would give
         * the same accumulators (0 + v differs from v only in the sign of a zero, which
         * adding into acc, started at +0, erases), but GCC turns the reset loops into
         * `rep stos`, a visible share of the channels-last statistics' time. */
        if (kind == CPUBN_SUM_VALUES) {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) sum[c] = a[c];
        } else if (kind == CPUBN_SUM_DEVIATIONS) {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) {
                float d = a[c] - pivot[c];
                sum[c] = d;
                sq[c] = d * d;
            }
        } else {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) {
                float g = a[c];
                sum[c] = g;
                sq[c] = g * (b[c] - pivot[c]);
            }
        }
        r = 1;
    } else if (first) {
        for (ptrdiff_t c = 0; c < width; c++) sum[c] = 0.0f;
        if (kind != CPUBN_SUM_VALUES)
            for (ptrdiff_t c = 0; c < width; c++) sq[c] = 0.0f;
    }
    for (; r < n; r++) {
        const float *ar = a + r * stride;
        if (kind == CPUBN_SUM_VALUES) {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) sum[c] += ar[c];
        } else if (kind == CPUBN_SUM_DEVIATIONS) {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) {
                float d = ar[c] - pivot[c];
                sum[c] += d;
                sq[c] += d * d;
            }
        } else {
            const float *br = b + r * stride;
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) {
                float g = ar[c];
                sum[c] += g;
                sq[c] += g * (br[c] - pivot[c]);
            }
        }
    }
    if (last) {
        CPUBN_SIMD
        for (ptrdiff_t c = 0; c < width; c++) acc[c] += (double)sum[c];
        if (kind != CPUBN_SUM_VALUES) {
            CPUBN_SIMD
            for (ptrdiff_t c = 0; c < width; c++) acc_sq[c] += (double)sq[c];
        }
    }
}

CPUBN_INLINE void grouped_pivot_sums(int kind, const float *a, const float *b, ptrdiff_t n,
                                     ptrdiff_t width, const float *pivot, int first, int last,
                                     float *sum, float *sq, double *acc, double *acc_sq)
{
    grouped_pivot_sums_at(kind, a, b, width, n, width, pivot, first, last, sum, sq, acc,
                          acc_sq);
}

/* The grouped-pivot sums of one group of n <= CPUBN_GROUP rows of `width` columns (row r
 * at a + r * stride, and b + r * stride for CPUBN_SUM_GRADIENTS), column tile after column
 * tile (CPUBN_ROW_TILE): each column sees the additions of one whole-row
 * grouped_pivot_sums call, in the same order, so the bits are the same; but a tile's group
 * sums stay in vector registers over the group's rows.  pivot and acc_sq: unused (may be
 * NULL) for CPUBN_SUM_VALUES; b: NULL unless CPUBN_SUM_GRADIENTS. */
CPUBN_INLINE void strided_group_pivot_sums(int kind, const float *a, const float *b,
                                           ptrdiff_t stride, ptrdiff_t n, ptrdiff_t width,
                                           const float *pivot, double *acc, double *acc_sq)
{
    float sum[CPUBN_ROW_TILE], sq[CPUBN_ROW_TILE];
    int values = kind == CPUBN_SUM_VALUES;
    ptrdiff_t c0 = 0;
    for (; c0 + CPUBN_ROW_TILE <= width; c0 += CPUBN_ROW_TILE)
        grouped_pivot_sums_at(kind, a + c0, b == NULL ? NULL : b + c0, stride, n,
                              CPUBN_ROW_TILE, values ? NULL : pivot + c0, 1, 1, sum, sq,
                              acc + c0, values ? NULL : acc_sq + c0);
    if (c0 < width)
        grouped_pivot_sums_at(kind, a + c0, b == NULL ? NULL : b + c0, stride, n, width - c0,
                              values ? NULL : pivot + c0, 1, 1, sum, sq, acc + c0,
                              values ? NULL : acc_sq + c0);
}

/* The grouped-pivot sums of a converted tile of the half-precision loops: `tile_rows` rows
 * (rows r to r + tile_rows of a block of `rows`) of `width` columns, row i at a + i *
 * width (and b + i * width), passed in pieces that end where the groups of CPUBN_GROUP
 * rows end.  A tile cuts the rows anywhere; the group sums (sum, sq: the columns' slots in
 * the caller's scratch) carry a group from tile to tile, so each column sees the
 * additions of the float32 loop, and the bits are float32 data's. */
CPUBN_INLINE void tile_group_pivot_sums(int kind, const float *a, const float *b,
                                        ptrdiff_t r, ptrdiff_t tile_rows, ptrdiff_t rows,
                                        ptrdiff_t width, const float *pivot, float *sum,
                                        float *sq, double *acc, double *acc_sq)
{
    for (ptrdiff_t i = 0; i < tile_rows;) {
        ptrdiff_t index = r + i;
        ptrdiff_t left = CPUBN_GROUP - index % CPUBN_GROUP;
        ptrdiff_t n = tile_rows - i < left ? tile_rows - i : left;
        int first = index % CPUBN_GROUP == 0;
        int last = (index + n) % CPUBN_GROUP == 0 || index + n == rows;
        grouped_pivot_sums(kind, a + i * width, b == NULL ? NULL : b + i * width, n, width,
                           pivot, first, last, sum, sq, acc, acc_sq);
        i += n;
    }
}

/* The float gradient sums of channels-last rows (float32 data and the half-precision
 * tiles, which must give float32's bits): sum(dy) and sum(dy * (x - pivot)) in grouped-
 * pivot sums with pivot = mean rounded to float, then
 *   sum(dy * (x - mean)) = sum(dy * (x - pivot)) - (mean - pivot) * sum(dy)
 * in double (the channels-first grad_sums_grouped does the same per run).
 * rows_grad_pivots sets the pivots and zeroes the sums; rows_grad_pivot_correction
 * applies the second line once every group has been added. */
CPUBN_INLINE void rows_grad_pivots(ptrdiff_t C, const double *mean, float *pivot,
                                   double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c = 0; c < C; c++) {
        pivot[c] = (float)mean[c];
        sum_dy[c] = 0.0;
        sum_dy_xmu[c] = 0.0;
    }
}

CPUBN_INLINE void rows_grad_pivot_correction(ptrdiff_t C, const double *mean,
                                             const float *pivot, const double *sum_dy,
                                             double *sum_dy_xmu)
{
    for (ptrdiff_t c = 0; c < C; c++)
        sum_dy_xmu[c] -= (mean[c] - (double)pivot[c]) * sum_dy[c];
}

/* The float32 and float64 loops (generated from loops_float.h.tp). */
#include "loops_float.h"

/* Chan et al. merge of a partial (count_b, mean_b, m2_b) into (count_a, mean_a, m2_a).
 * Stable for any offset: it only ever combines deviations from means.  An infinite
 * partial mean (the data holds +-inf) is combined as a weighted sum instead, so the mean
 * is +-inf or NaN as NumPy's would be, and the variance is NaN. */
static inline void chan_merge(double *count_a, double *mean_a, double *m2_a,
                              double count_b, double mean_b, double m2_b)
{
    double count = *count_a + count_b;
    double delta = mean_b - *mean_a;
    double weight_b = count_b / count;
    if (delta - delta == 0.0) {             /* delta is finite */
        *mean_a += delta * weight_b;
        *m2_a += m2_b + delta * delta * (*count_a) * weight_b;
    } else {
        *mean_a = *mean_a * (*count_a / count) + mean_b * weight_b;
        *m2_a = NAN;
    }
    *count_a = count;
}

/* Combine channels-last block partials for channels c0 <= c < c1: block b holds
 * min(rows, R - b * rows) rows and per-channel means[b * C + c], m2s[b * C + c].  The
 * weighted mean comes first, then the sum of within- and between-block squared deviations,
 * corrected like run_mean_m2; no division per partial, and the channel loop vectorizes.
 * Blocks are combined in index order, whoever computed them.  dev: scratch of C doubles. */
static void combine_row_blocks(const double *means, const double *m2s, ptrdiff_t blocks,
                               ptrdiff_t C, ptrdiff_t rows, ptrdiff_t R, ptrdiff_t c0,
                               ptrdiff_t c1, double *mean, double *m2, double *dev)
{
    for (ptrdiff_t c = c0; c < c1; c++) { mean[c] = 0.0; m2[c] = 0.0; dev[c] = 0.0; }
    for (ptrdiff_t b = 0; b < blocks; b++) {
        double count = (double)(R - b * rows < rows ? R - b * rows : rows);
        const double *block_mean = means + b * C;
        CPUBN_SIMD
        for (ptrdiff_t c = c0; c < c1; c++) mean[c] += count * block_mean[c];
    }
    for (ptrdiff_t c = c0; c < c1; c++) mean[c] /= (double)R;
    for (ptrdiff_t b = 0; b < blocks; b++) {
        double count = (double)(R - b * rows < rows ? R - b * rows : rows);
        const double *block_mean = means + b * C;
        const double *block_m2 = m2s + b * C;
        CPUBN_SIMD
        for (ptrdiff_t c = c0; c < c1; c++) {
            double d = block_mean[c] - mean[c];
            dev[c] += count * d;
            m2[c] += block_m2[c] + count * d * d;
        }
    }
    for (ptrdiff_t c = c0; c < c1; c++) {
        if (dev[c] - dev[c] == 0.0) mean[c] += dev[c] / (double)R;   /* finite: correct */
        m2[c] -= dev[c] * dev[c] / (double)R;
    }
}

/* float16 and bfloat16: tiles through the float32 loops (needs them and chan_merge). */
#include "half_convert.h"

/* Channels-first short runs, a slab of runs per call (generated from loops_slab.h.tp;
 * needs the float and half loops above). */
#include "loops_slab.h"

/* The per-channel steps of the forward, vectorized over the channels (generated from
 * channel_constants.h.tp). */
#include "channel_constants.h"

#endif
