// CUDA building blocks: block-wide reductions and the block-parallel runner of the K-element epilogues.
#pragma once
#include <cstdint>

#include "common/hd.h"

// Shared memory is declared through these two macros, so that the emulator (csrc/emu) can place it.
#ifdef KDK_EMU
#include "emu/cuda_emu.h"
#else
#define KDK_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#define KDK_STATIC_SMEM(type, name, dims) __shared__ type name dims
#endif

// Tensor-core (mma.sync / WMMA) code paths: sm_80 and later, which the emulator models.
#if defined(KDK_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define KDK_TENSOR_CORES 1
#else
#define KDK_TENSOR_CORES 0
#endif

namespace kdk {

template <class T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = kmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) over the block, returned to every thread. red: 32 elements of shared memory.
// Ends with a barrier, so red can be reused at once and writes before the call are visible after it.
template <class T, bool kMax> __device__ T block_reduce(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? red[lane] : (kMax ? neg_inf<T>() : T(0));
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  const T out = red[32];
  __syncthreads();
  return out;
}

// Online log-sum-exp pair (max, sum of exp(x - max)) reduced over the block.
template <class T> __device__ void block_lse_merge(T& m, T& s, T* red) {
  const T M = block_reduce<T, true>(m, red);
  T scaled = (m == neg_inf<T>()) ? T(0) : s * kexp(m - M);
  s = block_reduce<T, false>(scaled, red);
  m = M;
}

// Runs the K-loops of a shared epilogue across the block (see SeqReducer for the CPU twin).
template <class T> struct BlockReducer {
  T* red;  // 33 elements of shared memory
  template <class F> __device__ T sum(int K, F f) {
    T s = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) s += f(k);
    return block_reduce<T, false>(s, red);
  }
  template <class F> __device__ T max(int K, F f) {
    T m = neg_inf<T>();
    for (int k = threadIdx.x; k < K; k += blockDim.x) m = kmax(m, f(k));
    return block_reduce<T, true>(m, red);
  }
  template <class F> __device__ void each(int K, F f) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) f(k);
    __syncthreads();
  }
};

// Vector width (elements per 16-byte load) of a type.
template <class T> struct Vec16 { static constexpr int n = 16 / sizeof(T); };

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace kdk
