/* The only place cpubn touches the OpenMP runtime API.  In a build without OpenMP the
 * calls become serial stubs, so the Cython modules compile and run either way. */
#ifndef CPUBN_OMP_SHIM_H
#define CPUBN_OMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
#define CPUBN_OPENMP_ENABLED 1
#else
#define CPUBN_OPENMP_ENABLED 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_procs(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#endif
