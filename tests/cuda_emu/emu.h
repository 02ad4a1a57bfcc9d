// Host emulation of the CUDA execution model, enough for csrc/kernels/token_relation.cuh: every block
// runs 128 real threads; __syncthreads / __syncwarp are std::barrier waits; __shfl_xor_sync exchanges
// through a per-warp buffer between two warp barriers; dynamic shared memory is a per-block buffer
// filled with garbage (0xCD) as real shared memory would be. Blocks run one after the other.
#pragma once
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) alignas(x)
#define __shared__
#define KDK_TRK_EMULATION 1

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct WarpCtx {
  std::barrier<> bar{32};
  alignas(8) unsigned char buf[32][8];
};
struct BlockCtx {
  std::barrier<> bar{128};
  WarpCtx warps[4];
  std::vector<unsigned char> store;
  unsigned char* smem;
  explicit BlockCtx(size_t bytes) : store(bytes + 256, 0xCD) {
    smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(store.data()) + 255) & ~uintptr_t(255));
  }
};
inline thread_local BlockCtx* g_block = nullptr;

inline unsigned char* kdk_emu_smem() { return g_block->smem; }
inline void __syncthreads() { g_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_block->warps[threadIdx.x / 32].bar.arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  WarpCtx& w = g_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, w.buf[lane ^ lane_mask], sizeof(T));
  w.bar.arrive_and_wait();
  return out;
}

template <class Kernel, class Params> void emu_launch(Kernel kernel, int64_t grid, size_t smem, const Params& p) {
  for (int64_t b = 0; b < grid; ++b) {
    BlockCtx block(smem);
    std::vector<std::thread> threads;
    threads.reserve(128);
    for (unsigned t = 0; t < 128; ++t)
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {static_cast<unsigned>(b), 0, 0};
        blockDim = {128, 1, 1};
        gridDim = {static_cast<unsigned>(grid), 1, 1};
        g_block = &block;
        kernel(p);
      });
    for (auto& th : threads) th.join();
  }
}
