/* The loops of bn_loops.h for half-precision data: float16 (suffix _f16) and bfloat16
 * (suffix _bf16), staged through float tiles.
 *
 * Why not the float template with conversions inlined: compilers vectorize the portable
 * bit-manipulation conversions (cpubn_half_to_float and friends in bn_loops.h) poorly when
 * they are mixed into arithmetic loops, and do not vectorize _Float16 conversions at all
 * without AVX512-FP16, so such loops ran several times slower than the float32 ones.
 * Instead, each loop converts a tile of at most CPUBN_HALF_TILE values into an L1-resident
 * float buffer, runs the float32 loop on the tile, and converts its output back; the
 * element-wise loops (normalization, input gradient) convert in registers instead.
 * Conversions take 8 values per instruction with F16C (float16) or AVX2 (bfloat16), chosen
 * at run time, and the portable scalar code elsewhere or with CPUBN_PORTABLE_HALF=1 in the
 * environment.  Both are exact / round to nearest even, so every CPU gives the same bits,
 * and the results are bitwise those of float32 data holding the same values (then rounded
 * once to the half type).
 *
 * Tiles are contiguous: a run is cut into pieces of CPUBN_HALF_TILE (CPUBN_HALF_RUN_TILE
 * for reductions); a block of channels-last rows into groups of whole rows when
 * C <= CPUBN_HALF_TILE, else into pieces of one row.  Outputs are written with ordinary
 * stores (the _stream variants are the plain loops): a half-precision output is half the
 * bytes of the float32 one that the streaming threshold was chosen for.
 */
#ifndef CPUBN_BN_LOOPS_HALF_H
#define CPUBN_BN_LOOPS_HALF_H

#include <stdlib.h>

#define CPUBN_HALF_TILE 2048
/* Channels-first reductions: a whole chunk of a run (partition.pxd's RUN_CHUNK) per tile. */
#define CPUBN_HALF_RUN_TILE 16384

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define CPUBN_HALF_VECTORS 1

/* Whether this CPU has the 8-wide conversions of one format (cached; a benign race, every
 * thread stores the same value). */
static int cpubn_half_vectors_ok(int bfloat16)
{
    static int known[2] = {-1, -1};
    if (known[bfloat16] < 0) {
        const char *portable = getenv("CPUBN_PORTABLE_HALF");
        __builtin_cpu_init();
        known[bfloat16] = (portable == NULL || portable[0] == '\0' || portable[0] == '0')
            && (bfloat16 ? __builtin_cpu_supports("avx2")
                         : __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"));
    }
    return known[bfloat16];
}

static inline cpubn_half cpubn_half_from_bits(unsigned short bits)
{
    cpubn_half h = {bits};
    return h;
}

/* bfloat16 is a float's top half: widen and shift to load; to store, round to nearest
 * even in the integer domain (NaN: quieted, sign kept) and narrow. */
#define CPUBN_BF16_LOAD8(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))

__attribute__((target("avx2")))
static inline void cpubn_bf16_store8(cpubn_bfloat16 *p, __m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i high = _mm256_srli_epi32(u, 16);
    __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
    __m256i bits = _mm256_blendv_epi8(rounded, nan,
                                      _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                                    _mm256_extracti128_si256(bits, 1)));
}
#endif

/* The conversions this process uses ("F16C", "AVX2" or "portable"), for python -m cpubn info. */
static const char *cpubn_half_conversions(int bfloat16)
{
#ifdef CPUBN_HALF_VECTORS
    if (cpubn_half_vectors_ok(bfloat16))
        return bfloat16 ? "AVX2" : "F16C";
#endif
    (void)bfloat16;
    return "portable";
}

#define T cpubn_half
#define SUFFIX _f16
#define TO_FLOAT cpubn_half_to_float
#define FROM_FLOAT cpubn_half_from_float
#define VECTOR_TARGET "avx,f16c"
#define LOAD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define STORE8(p, v) \
    _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define SCALAR_TO_FLOAT(h) _cvtsh_ss((h).bits)
#define SCALAR_FROM_FLOAT(f) cpubn_half_from_bits(_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT))
#define VECTOR_OK cpubn_half_vectors_ok(0)
#include "bn_loops_half_impl.h"

#define T cpubn_bfloat16
#define SUFFIX _bf16
#define TO_FLOAT cpubn_bfloat16_to_float
#define FROM_FLOAT cpubn_bfloat16_from_float
#define VECTOR_TARGET "avx2"
#define LOAD8 CPUBN_BF16_LOAD8
#define STORE8 cpubn_bf16_store8
#define SCALAR_TO_FLOAT cpubn_bfloat16_to_float          /* a shift: cheap already */
#define SCALAR_FROM_FLOAT cpubn_bfloat16_from_float
#define VECTOR_OK cpubn_half_vectors_ok(1)
#include "bn_loops_half_impl.h"

#endif
