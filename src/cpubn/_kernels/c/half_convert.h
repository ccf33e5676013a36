/* Half-precision support of loops.h: the conversions, and the loops for float16
 * (suffix _f16) and bfloat16 (suffix _bf16) data, staged through float tiles.
 *
 * Why not the float template with conversions inlined: compilers vectorize the portable
 * bit-manipulation conversions (cpubn_half_to_float and friends in loops.h) poorly when
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
 * C <= CPUBN_HALF_TILE, else into pieces of one row.  Tiles live in the calling
 * thread's heap scratch (`work`), never on an OpenMP worker's stack.  Outputs are written
 * with ordinary stores (`stream` is ignored): a half-precision output is half the bytes
 * of the float32 one that the streaming threshold was chosen for.
 */
#ifndef CPUBN_BN_LOOPS_HALF_H
#define CPUBN_BN_LOOPS_HALF_H

#include <stdlib.h>

/* Whether this CPU has the 8-wide conversions of a format ([0]: float16, [1]: bfloat16).
 * Written only by cpubn_half_init, which each kernel module calls once when it is
 * imported (under the GIL, never inside a parallel region); the loops only read it.
 * Until then, and with CPUBN_PORTABLE_HALF=1 in the environment, 0: the portable code. */
static int cpubn_half_vectors[2];

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define CPUBN_HALF_VECTORS 1

static void cpubn_half_init(void)
{
    const char *portable = getenv("CPUBN_PORTABLE_HALF");
    int allowed = portable == NULL || portable[0] == '\0' || portable[0] == '0';
    __builtin_cpu_init();
    cpubn_half_vectors[0] = allowed && __builtin_cpu_supports("avx")
                            && __builtin_cpu_supports("f16c");
    cpubn_half_vectors[1] = allowed && __builtin_cpu_supports("avx2");
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
#else
static void cpubn_half_init(void) {}
#endif

/* The conversions this process uses ("F16C", "AVX2" or "portable"), for python -m cpubn info. */
static const char *cpubn_half_conversions(int bfloat16)
{
#ifdef CPUBN_HALF_VECTORS
    if (cpubn_half_vectors[bfloat16 ? 1 : 0])
        return bfloat16 ? "AVX2" : "F16C";
#endif
    (void)bfloat16;
    return "portable";
}

/* float16: F16C.  bfloat16: AVX2 (CPUBN_BF16_LOAD8 / cpubn_bf16_store8 above); its scalar
 * conversions are a shift and a rounding, cheap already. */
#define CPUBN_F16_LOAD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define CPUBN_F16_STORE8(p, v) \
    _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define CPUBN_F16_SCALAR_TO_FLOAT(h) _cvtsh_ss((h).bits)
#define CPUBN_F16_SCALAR_FROM_FLOAT(f) cpubn_half_from_bits(_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT))

/* The loops (generated from loops_half.h.tp). */
#include "loops_half.h"

#endif
