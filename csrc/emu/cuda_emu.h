// Host emulation of the CUDA execution model for the launchers and kernels of kdkernels (KDK_EMU builds):
// the built-ins the device code uses and the launch entry point (torch-free, as the kernels are).
// Runtime: csrc/emu/runtime.cpp; the op wrapper: csrc/emu/op_scope.h.
//
// Every CUDA thread runs as a fiber on the calling OS thread; barriers, warp exchanges and votes switch
// fibers, so a block runs deterministically. Emulated translation units are compiled with
// -fsanitize=kernel-address in call mode: every load and store calls the runtime, which checks it against
// the block's shared memory (races, never-written bytes), the fiber's stack, and the global allocations
// the op may touch (out-of-bounds). The runtime is built the same way: every entry point kernel code
// calls is itself unchecked (KDK_EMU_NO_CHECK) and pauses the checks while it runs.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// The bound is recorded as that many NOP bytes at the kernel's entry (GCC's patchable_function_entry),
// so the launch can read each kernel's __launch_bounds__ without a second declaration of it.
#define __launch_bounds__(...) KDK_EMU_BOUNDS_(__VA_ARGS__, 0)
#define KDK_EMU_BOUNDS_(n, ...) __attribute__((patchable_function_entry((n), 0)))
#define KDK_EMU_NO_CHECK __attribute__((no_sanitize_address, noinline))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace kdk_emu {

// ---- the emulated device -------------------------------------------------------------------------
struct Device {
  int arch = 80;                   // which hardware limits the launch checks apply (80 or 90)
  size_t max_smem_optin = 166912;  // 163 KiB on sm_80, 227 KiB on sm_90
  int num_sms = 4;                 // few SMs keep grid-stride loops short in emulation
};
Device& device();

// ---- the current thread (values, never references into the runtime: reads stay on the fiber stack) ----
dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
unsigned char* dynamic_smem();
unsigned char* static_smem(const void* key, size_t bytes, size_t align);

// ---- synchronisation and warp collectives --------------------------------------------------------
void syncthreads();
void syncwarp(unsigned mask);
enum class Shfl { kIdx, kXor, kUp, kDown };
void shfl(Shfl kind, unsigned mask, const void* in, void* out, size_t bytes, int arg, int width);
unsigned vote_ballot(unsigned mask, bool pred);
void atomic_add(void* addr, const void* val, void* old, int kind);  // kind: 0 float, 1 double, 2 int, 3 u64

// ---- launch ---------------------------------------------------------------------------------------
using Body = void (*)(const void* closure);
void run(const void* kernel, dim3 grid, dim3 block, size_t smem, Body body, const void* closure);
void set_max_dynamic_smem(const void* kernel, size_t bytes);

template <class... P> struct Closure {
  void (*kernel)(P...);
  std::tuple<P...> args;
};
// Copies the launch arguments onto the fiber's stack, then calls the kernel with them. Not instrumented:
// it reads the closure from the launching thread's stack, which no kernel may touch.
template <class... P> KDK_EMU_NO_CHECK void call_kernel(const void* c) {
  using Args = std::tuple<P...>;
  static_assert((std::is_trivially_copyable_v<P> && ...), "kernel arguments must be trivially copyable");
  const auto* cl = static_cast<const Closure<P...>*>(c);
  alignas(Args) unsigned char copy[sizeof(Args)];
  std::memcpy(copy, &cl->args, sizeof(Args));
  void (*kernel)(P...) = cl->kernel;
  std::apply(kernel, *reinterpret_cast<Args*>(copy));
}
template <class... P> void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, P... args) {
  const Closure<P...> closure{kernel, std::tuple<P...>(args...)};
  run(reinterpret_cast<const void*>(kernel), grid, block, smem, &call_kernel<P...>, &closure);
}

}  // namespace kdk_emu

// ---- the CUDA built-ins --------------------------------------------------------------------------
#define threadIdx (::kdk_emu::thread_idx())
#define blockIdx (::kdk_emu::block_idx())
#define blockDim (::kdk_emu::block_dim())
#define gridDim (::kdk_emu::grid_dim())
constexpr int warpSize = 32;
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Shared memory: `__shared__` itself is not emulated (a block-wide variable cannot be a C++ local);
// kernels declare it with these two macros (csrc/common/cuda_utils.cuh has the nvcc spelling).
#define KDK_DYNAMIC_SMEM(name, align) unsigned char* const name = ::kdk_emu::dynamic_smem()
#define KDK_STATIC_SMEM(type, name, dims)                                                                  \
  static const char kdk_smem_key_##name = 0;                                                               \
  using kdk_smem_t_##name = type dims;                                                                     \
  kdk_smem_t_##name& name = *reinterpret_cast<kdk_smem_t_##name*>(                                        \
      ::kdk_emu::static_smem(&kdk_smem_key_##name, sizeof(kdk_smem_t_##name), alignof(kdk_smem_t_##name)))

inline void __syncthreads() { ::kdk_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::kdk_emu::syncwarp(mask); }

template <class T> inline T kdk_emu_shfl(::kdk_emu::Shfl k, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "emulated shuffles move up to 8 bytes");
  T out;
  ::kdk_emu::shfl(k, mask, &v, &out, sizeof(T), arg, width);
  return out;
}
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) {
  return kdk_emu_shfl(::kdk_emu::Shfl::kIdx, m, v, src, w);
}
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int lane_mask, int w = 32) {
  return kdk_emu_shfl(::kdk_emu::Shfl::kXor, m, v, lane_mask, w);
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
  return kdk_emu_shfl(::kdk_emu::Shfl::kUp, m, v, int(d), w);
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
  return kdk_emu_shfl(::kdk_emu::Shfl::kDown, m, v, int(d), w);
}
inline unsigned __ballot_sync(unsigned m, int p) { return ::kdk_emu::vote_ballot(m, p != 0); }
inline int __any_sync(unsigned m, int p) { return ::kdk_emu::vote_ballot(m, p != 0) != 0; }
inline int __all_sync(unsigned m, int p) { return ::kdk_emu::vote_ballot(m, p != 0) == m; }

inline float atomicAdd(float* a, float v) { float o; ::kdk_emu::atomic_add(a, &v, &o, 0); return o; }
inline double atomicAdd(double* a, double v) { double o; ::kdk_emu::atomic_add(a, &v, &o, 1); return o; }
inline int atomicAdd(int* a, int v) { int o; ::kdk_emu::atomic_add(a, &v, &o, 2); return o; }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  unsigned long long o; ::kdk_emu::atomic_add(a, &v, &o, 3); return o;
}

// Device math the kernels call that has no host spelling. __expf is the hardware's approximate exp;
// the host expf is more accurate, which the float tolerances of the tests absorb.
inline float __expf(float x) { return ::expf(x); }
inline float __logf(float x) { return ::logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
