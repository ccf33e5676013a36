/* Function multiversioning of the kernels' loops: with gcc on x86-64 Linux every loop
 * marked CPUBN_CLONES is compiled for AVX-512, AVX2 and baseline x86-64, and the loader
 * picks one instance per machine (an ifunc resolver).  cpubn_kernel_isa() names the
 * instance this machine runs, so that a benchmark says what it measured (the same
 * wheel runs 512-bit loops on one server and 256-bit ones on an older one). */
#ifndef CPUBN_SIMD_DISPATCH_H
#define CPUBN_SIMD_DISPATCH_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(CPUBN_NO_CLONES) && !defined(__AVX512F__)
#define CPUBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define CPUBN_HAS_CLONES 1
#else
#define CPUBN_CLONES
#define CPUBN_HAS_CLONES 0
#endif

/* "avx512f", "avx2" or "default": the resolver's own test, in its order of priority.
 * Without clones the loops are built for the compiler's target only: "avx512f" when
 * that target has AVX-512, else "native" (whatever the build flags allow). */
static inline const char *cpubn_kernel_isa(void)
{
#if CPUBN_HAS_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "avx512f";
    if (__builtin_cpu_supports("avx2")) return "avx2";
    return "default";
#elif defined(__AVX512F__)
    return "avx512f";
#else
    return "native";
#endif
}

#endif
