// The one seam between CUDA launchers and the device: launch, device guard, shared-memory opt-in, device
// attributes and op registration. nvcc builds get the CUDA runtime; KDK_EMU builds (kdkernels._emu) get the
// host emulator in csrc/emu, so the same launcher source runs on CPU tensors with every check on.
#pragma once
#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>

#ifdef KDK_EMU
#include "emu/cuda_emu.h"
#include "emu/op_scope.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

// The op library and dispatch key the launchers register under: the real ops on CUDA tensors, or the
// emulated ops (same schemas, own namespace) on CPU tensors.
#ifdef KDK_EMU
#define KDK_LIB kdkernels_emu
#define KDK_DEVICE_KEY CPU
#define KDK_IMPL(fn) (&::kdk_emu::OpEntry<decltype(fn), fn>::call)
#else
#define KDK_LIB kdkernels
#define KDK_DEVICE_KEY CUDA
#define KDK_IMPL(fn) (&fn)
#endif

namespace kdk {

#ifdef KDK_EMU
using DeviceGuard = ::kdk_emu::DeviceGuard;
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// Launches kernel<<<grid, block, smem, current stream>>>(args...) and checks the launch.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
#ifdef KDK_EMU
  ::kdk_emu::launch(kernel, grid, block, smem, static_cast<P>(args)...);
#else
  kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(static_cast<P>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Opts a kernel in to `bytes` of dynamic shared memory; needed above the default 48 KiB.
template <class... P> void allow_dynamic_smem(void (*kernel)(P...), size_t bytes) {
#ifdef KDK_EMU
  ::kdk_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
#else
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#endif
}

// The current device's opt-in limit of dynamic shared memory per block, in bytes.
inline size_t max_dynamic_smem_optin() {
#ifdef KDK_EMU
  return ::kdk_emu::device().max_smem_optin;
#else
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(v);
#endif
}

// Streaming multiprocessors of the current device.
inline int num_sms() {
#ifdef KDK_EMU
  return ::kdk_emu::device().num_sms;
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

}  // namespace kdk
