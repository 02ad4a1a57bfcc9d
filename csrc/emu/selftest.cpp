// Deliberately broken kernels (and correct twins) that prove each check of the emulator fires:
// torch.ops.kdkernels_emu.emu_selftest(check, x), used by tests/test_emu.py.
#include <string>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "common/launch.h"
#include "common/tile_mma.cuh"

namespace kdk {

struct SelftestArgs {
  float* x;     // the op's tensor
  int64_t n;    // its elements
  float* out;   // (blockDim.x,) output
  int mode;
};

// Shared-memory protocols: mode 0 is correct; each other mode leaves out a barrier or reads garbage.
__global__ void selftest_shared_kernel(SelftestArgs a) {
  KDK_DYNAMIC_SMEM(raw, 16);
  float* s = reinterpret_cast<float*>(raw);
  const int t = threadIdx.x;
  switch (a.mode) {
    case 0:  // write, barrier, read a neighbour's value, barrier, overwrite
      s[t] = float(t);
      __syncthreads();
      a.out[t] = s[(t + 1) % blockDim.x];
      __syncthreads();
      s[t] = 0.f;
      break;
    case 1:  // read after write with no barrier (thread t reads what thread t - 1 wrote)
      s[t] = float(t);
      a.out[t] = s[t > 0 ? t - 1 : 0];
      break;
    case 2:  // write after write with no barrier
      s[0] = float(t);
      break;
    case 3:  // write after read with no barrier
      s[t] = float(t);
      __syncthreads();
      a.out[t] = s[(t + 1) % blockDim.x];
      s[t] = 0.f;
      break;
    case 4:  // a value never written in this block
      if (t == 0) s[1] = 1.f;
      __syncthreads();
      a.out[t] = s[t];
      break;
    case 5:  // lanes of one warp exchange through shared memory ordered by __syncwarp: correct
      s[t] = float(t);
      __syncwarp();
      a.out[t] = s[t ^ 1];
      break;
    case 6:  // the same exchange with a shuffle in place of __syncwarp: shuffles do not order memory
      s[t] = float(t);
      a.out[t] = __shfl_xor_sync(0xffffffffu, s[t], 1) + s[t ^ 1];
      break;
    case 7:  // past the end of the block's dynamic shared memory
      a.out[t] = s[blockDim.x + t];
      break;
    case 8:  // shared atomics: every thread adds to one counter, a barrier, everyone reads it: correct
      if (t == 0) s[0] = 0.f;
      __syncthreads();
      atomicAdd(&s[0], 1.f);
      __syncthreads();
      a.out[t] = s[0];
      break;
    case 9:  // an atomic's result read without a barrier
      if (t == 0) s[0] = 0.f;
      __syncthreads();
      atomicAdd(&s[0], 1.f);
      a.out[t] = s[0];
      break;
    case 10:  // divergent halves of a warp, each synchronising only itself: correct
      s[t] = float(t);
      if ((t & 31) < 16) {
        __syncwarp(0x0000ffffu);
        a.out[t] = s[t ^ 1];
      } else {
        __syncwarp(0xffff0000u);
        a.out[t] = s[t ^ 1];
      }
      break;
    case 11:  // lane 0 reads twice around a __syncwarp, then lane 1 overwrites with no sync after the second read
      s[t] = float(t);
      __syncthreads();
      if ((t & 31) == 0) a.out[t] = s[t];
      __syncwarp();
      if ((t & 31) == 0) a.out[t] += s[t];
      if ((t & 31) == 1) s[t - 1] = 0.f;
      break;
    default: break;
  }
}

// Global memory and warp collectives.
__global__ void selftest_global_kernel(SelftestArgs a) {
  const int t = threadIdx.x;
  switch (a.mode) {
    case 0: {  // correct: a warp sum of the tensor's first elements
      float v = t < a.n ? a.x[t] : 0.f;
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      a.out[t] = v;
      break;
    }
    case 1:  // one element past the end of the tensor
      if (t == 0) a.out[0] = a.x[a.n];
      break;
    case 2:  // a write far outside any tensor
      if (t == 0) a.x[a.n + (int64_t(1) << 22)] = 1.f;
      break;
    case 3:  // a full-warp mask where only half the warp calls the shuffle
      if ((t & 31) < 16) a.out[t] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      break;
    case 4:  // a shuffle that reads a lane outside its mask
      if ((t & 31) < 16) a.out[t] = __shfl_sync(0x0000ffffu, 1.f, 20);
      break;
    case 5:  // butterfly shuffles within groups of 16 lanes: correct (each lane gets lane ^ 8's value)
      a.out[t] = __shfl_xor_sync(0xffffffffu, float(t), 8, 16);
      break;
    default: break;
  }
}

// Tile primitives (common/tile_mma.cuh) used wrongly: each mode but 0 breaks one rule of cp.async / ldmatrix /
// mma.sync. One warp; x holds at least 64 floats (256 bytes, 16 rows of 16 bytes).
__global__ void selftest_tile_kernel(SelftestArgs a) {
  KDK_STATIC_SMEM(uint4, s, [16]);
  const int l = threadIdx.x;
  const auto* src = reinterpret_cast<const uint4*>(a.x);
  uint32_t r[1] = {0u};
  const uint32_t fa[4] = {0u, 0u, 0u, 0u}, fb[2] = {0u, 0u};
  float d[4], c[4] = {0.f, 0.f, 0.f, 0.f};
  switch (a.mode) {
    case 0:  // copy, wait, order the warp, read another lane's row: correct
    case 1:  // the same, read before the copy's group was waited for
    case 2:  // waited, but not ordered before other lanes read the rows
      if (l < 16) kdk::tile::cp_async16(&s[l], &src[l]);
      kdk::tile::cp_async_commit();
      if (a.mode != 1) kdk::tile::cp_async_wait<0>();
      if (a.mode == 0) __syncwarp();
      kdk::tile::ldmatrix<1>(r, &s[l & 7]);
      a.out[l] = static_cast<float>(r[0] & 0xffffu);
      break;
    case 3:  // an ldmatrix row address that is not 16-byte aligned
      if (l < 16) s[l] = make_uint4(1u, 2u, 3u, 4u);
      __syncwarp();
      kdk::tile::ldmatrix<1>(r, reinterpret_cast<const unsigned char*>(&s[l & 7]) + 4);
      break;
    case 4:  // an mma.sync by half of the warp
      if (l < 16) kdk::tile::mma16816<true>(d, fa, fb, c);
      break;
    case 5:  // cp.async into global memory
      kdk::tile::cp_async16(a.x, &src[1]);
      break;
    default: break;
  }
}

__global__ void __launch_bounds__(128) selftest_bounded_kernel(SelftestArgs a) {
  if (threadIdx.x == 0) a.out[0] = 1.f;
}

namespace {

at::Tensor emu_selftest(c10::string_view check_sv, const at::Tensor& x) {
  const std::string check(check_sv);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() >= 1,
              "emu_selftest: x must be a non-empty contiguous float32 tensor");
  at::Tensor out = at::zeros({256}, x.options());
  SelftestArgs a{x.data_ptr<float>(), x.numel(), out.data_ptr<float>(), 0};
  const size_t smem = 128 * sizeof(float);
  static const char* shared[] = {"shared_ok", "race_raw", "race_waw", "race_war", "uninit", "warp_sync_ok",
                                 "race_warp", "shared_oob", "atomic_ok", "race_atomic", "divergent_syncwarp_ok",
                                 "race_war_reread"};
  for (int i = 0; i < 12; ++i)
    if (check == shared[i]) {
      a.mode = i;
      launch(selftest_shared_kernel, 2, 128, smem, a);
      return out;
    }
  static const char* global[] = {"global_ok", "global_read_oob", "global_write_oob", "shfl_mask", "shfl_lane",
                                 "shfl_width_ok"};
  for (int i = 0; i < 6; ++i)
    if (check == global[i]) {
      a.mode = i;
      launch(selftest_global_kernel, 1, 64, 0, a);
      return out;
    }
  static const char* tile[] = {"tile_ok", "cp_async_no_wait", "cp_async_no_sync", "ldmatrix_misaligned",
                               "mma_half_warp", "cp_async_to_global"};
  for (int i = 0; i < 6; ++i)
    if (check == tile[i]) {
      TORCH_CHECK(x.numel() >= 64, "emu_selftest: the tile checks need x of at least 64 elements");
      a.mode = i;
      launch(selftest_tile_kernel, 1, 32, 0, a);
      return out;
    }
  if (check == "block_too_big") launch(selftest_global_kernel, 1, 2048, 0, a);
  else if (check == "launch_bounds") launch(selftest_bounded_kernel, 1, 256, 0, a);
  else if (check == "launch_bounds_ok") launch(selftest_bounded_kernel, 1, 128, 0, a);
  else if (check == "grid_y") launch(selftest_global_kernel, dim3(1, 70000), 32, 0, a);
  else if (check == "smem_no_optin") launch(selftest_global_kernel, 1, 128, 64 * 1024, a);
  else if (check == "smem_optin_ok") {
    allow_dynamic_smem(selftest_shared_kernel, 64 * 1024);
    launch(selftest_shared_kernel, 1, 128, 64 * 1024, a);
  } else if (check == "smem_over_device") {
    allow_dynamic_smem(selftest_global_kernel, 240 * 1024);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown check '", check, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdkernels_emu, m) { m.def("emu_selftest(str check, Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(kdkernels_emu, CPU, m) { m.impl("emu_selftest", KDK_IMPL(emu_selftest)); }

}  // namespace kdk
