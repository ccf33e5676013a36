/* Innermost loops of the cpubn kernels, for float (suffix _f32) and double (suffix _f64).
 *
 * Why C and not Cython: the reductions need several independent vector accumulators and
 * `#pragma omp simd`, which Cython cannot express, and each loop is compiled for AVX-512,
 * AVX2 and baseline x86-64 and picked at load time (function multiversioning), so a
 * portable wheel still runs at full vector width.  The loops are written so that every
 * clone performs the same floating-point operations in the same order: results do not
 * depend on the instruction set (the build also disables FMA contraction).
 *
 * Two layouts, two families:
 *   run_*  : one contiguous run of one channel (channels-first: x[n, c, 0:S]).
 *   rows_* : a block of rows of a (rows, C) matrix, per-channel work vectorized over C
 *            (channels-last).
 * All reductions accumulate in double.  The templated bodies live in bn_loops_impl.h.
 */
#ifndef CPUBN_BN_LOOPS_H
#define CPUBN_BN_LOOPS_H

#include <math.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(CPUBN_NO_CLONES) && !defined(__AVX512F__)
#define CPUBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPUBN_CLONES
#endif

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

/* Bytes computed into an L1-resident buffer before each streaming copy. */
#define CPUBN_STREAM_BUFFER 8192

#define CPUBN_CAT_(a, b) a##b
#define CPUBN_CAT(a, b) CPUBN_CAT_(a, b)

#define T float
#define SUFFIX _f32
#define CPUBN_FLOAT_DATA 1
#include "bn_loops_impl.h"
#undef T
#undef SUFFIX
#undef CPUBN_FLOAT_DATA

#define T double
#define SUFFIX _f64
#define CPUBN_FLOAT_DATA 0
#include "bn_loops_impl.h"
#undef T
#undef SUFFIX
#undef CPUBN_FLOAT_DATA

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

#endif
