// Shared by the CPU (.cpp) and CUDA (.cu) translation units.
//
// DIP_HD marks a function that both compilers must emit: per-element math lives
// once in csrc/common and is called from the CPU loops and from the CUDA
// kernels alike, so the two backends cannot drift apart.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIP_HD __host__ __device__ __forceinline__
#else
#define DIP_HD inline
#endif

// DIP_UNROLL asks nvcc to unroll a loop of constant trip count fully, so that
// the arrays it indexes stay in registers instead of local memory (GCC
// unrolls such loops by itself at -O3 and would warn about the pragma).
// DIP_NO_UNROLL keeps a loop rolled where unrolling only multiplies live
// predicates and registers.
#if defined(__CUDA_ARCH__)
#define DIP_UNROLL _Pragma("unroll")
#define DIP_NO_UNROLL _Pragma("unroll 1")
#else
#define DIP_UNROLL
#define DIP_NO_UNROLL
#endif

// DIP_CPU_CLONES marks a CPU hot loop to be compiled three times, for
// AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline, with the best
// one picked when the library loads (GCC's function multi-versioning, an
// ifunc; other compilers build the baseline only). The extension is thus fast
// on the machine it runs on without -march=native, whose binaries crash on
// older CPUs. The loops are written to vectorise; only the instruction set
// differs between the copies. DIP_INLINE pulls a helper into those copies.
#if defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__) && !defined(__clang__) && \
    defined(__GNUC__) && __GNUC__ >= 11 && !defined(DIP_FAST_NO_CPU_CLONES)
#define DIP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DIP_CPU_CLONES
#endif
#define DIP_INLINE inline __attribute__((always_inline))
