// Host emulation of the CUDA built-ins csrc/kernels/attention.cuh uses, so its device code runs on a CPU:
// each block runs as blockDim.x std::threads (one block at a time), __syncthreads is a std::barrier, warp
// shuffles go through a per-warp exchange buffer, atomics are std::atomic_ref, dynamic shared memory is one
// static buffer poisoned with NaN bytes before every block. Catches indexing, synchronisation and masking
// errors; says nothing about performance, memory coalescing or half/bfloat16 paths.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)
struct dim3emu { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3emu threadIdx, blockIdx;
inline dim3emu blockDim, gridDim;
struct EmuBlock {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<double> xchg;
};
inline EmuBlock* g_block = nullptr;
inline void __syncthreads() { g_block->bar->arrive_and_wait(); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  g_block->xchg[t] = static_cast<double>(v);
  g_block->warp[w]->arrive_and_wait();
  const T r = static_cast<T>(g_block->xchg[w * 32 + (lane ^ o)]);
  g_block->warp[w]->arrive_and_wait();
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { g_block->warp[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
namespace kdk { alignas(16) inline unsigned char kdk_attn_smem[1 << 22]; }

template <class F> void emu_launch(dim3emu grid, unsigned threads, size_t smem, F kernel) {
  if (smem > sizeof(kdk::kdk_attn_smem)) { fprintf(stderr, "smem too big\n"); abort(); }
  blockDim = {threads, 1, 1};
  gridDim = grid;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      EmuBlock blk;
      blk.bar = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < threads / 32; ++w) blk.warp.push_back(std::make_unique<std::barrier<>>(32));
      blk.xchg.assign(threads, 0.0);
      // poison shared memory: stale values must never be read
      for (size_t i = 0; i < smem; ++i) kdk::kdk_attn_smem[i] = 0xFF;  // NaN pattern for floats/doubles
      g_block = &blk;
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] { threadIdx = {t, 0, 0}; blockIdx = {bx, by, 0}; kernel(); });
      for (auto& th : ts) th.join();
    }
}
