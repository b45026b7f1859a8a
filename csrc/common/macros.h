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
