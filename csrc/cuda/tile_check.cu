// Launcher of the tile-primitive checks (kernels/tile_check.cuh): torch.ops.kdkernels.tile_check, a test op
// registered only where device code runs (CUDA builds and the emulator), never part of the public API.
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/launch.h"
#include "kernels/tile_check.cuh"

namespace kdk {
namespace {

void need(const at::Tensor& x, const char* name, std::vector<int64_t> shape, std::initializer_list<at::ScalarType> dt) {
  bool ok_dt = false;
  for (auto d : dt) ok_dt = ok_dt || x.scalar_type() == d;
  TORCH_CHECK(ok_dt && x.sizes() == at::IntArrayRef(shape) && x.is_contiguous(), "kdkernels.tile_check: ", name,
              " must be a contiguous tensor of shape ", at::IntArrayRef(shape), " and a supported dtype: got ",
              x.sizes(), " ", x.scalar_type());
}

// prim: "mma" (16-bit A (16, 16), B (16, 8) or with bt B^T (8, 16)), "mma_tf32" (float32 A (16, 8), B (8, 8)),
// "ldmatrix_x1" / "_x2" / "_x4" (+ "_trans"; a (16, 16) 16-bit). Returns D (16, 8) float32 for the mma checks,
// the lanes' registers (32, 4) int32 for ldmatrix.
at::Tensor tile_check_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, c10::string_view prim_sv,
                           bool bt, int64_t m_valid) {
  const std::string prim(prim_sv);
  DeviceGuard guard(a.device());
  const bool tf32 = prim == "mma_tf32";
  if (prim == "mma" || tf32) {
    if (tf32) {
      need(a, "a", {16, 8}, {at::kFloat});
      need(b, "b", {8, 8}, {at::kFloat});
    } else {
      need(a, "a", {16, 16}, {at::kBFloat16, at::kHalf});
      need(b, "b", bt ? std::vector<int64_t>{8, 16} : std::vector<int64_t>{16, 8}, {a.scalar_type()});
    }
    need(c, "c", {16, 8}, {at::kFloat});
    auto d = at::empty({16, 8}, c.options());
    TileCheckArgs p{static_cast<const unsigned char*>(a.data_ptr()), static_cast<const unsigned char*>(b.data_ptr()),
                    c.data_ptr<float>(), d.data_ptr<float>(), nullptr, static_cast<int>(m_valid)};
    const bool bf = a.scalar_type() == at::kBFloat16;
    if (tf32) launch(tile_mma_tf32_check_kernel, dim3(1), dim3(32), 0, p);
    else if (bf && bt) launch(tile_mma_check_kernel<true, true>, dim3(1), dim3(32), 0, p);
    else if (bf) launch(tile_mma_check_kernel<true, false>, dim3(1), dim3(32), 0, p);
    else if (bt) launch(tile_mma_check_kernel<false, true>, dim3(1), dim3(32), 0, p);
    else launch(tile_mma_check_kernel<false, false>, dim3(1), dim3(32), 0, p);
    return d;
  }
  need(a, "a", {16, 16}, {at::kBFloat16, at::kHalf});
  auto regs = at::zeros({32, 4}, a.options().dtype(at::kInt));
  TileCheckArgs p{static_cast<const unsigned char*>(a.data_ptr()), nullptr, nullptr, nullptr,
                  reinterpret_cast<uint32_t*>(regs.data_ptr<int>()), 16};
  if (prim == "ldmatrix_x1") launch(tile_ldmatrix_check_kernel<1, false>, dim3(1), dim3(32), 0, p);
  else if (prim == "ldmatrix_x2") launch(tile_ldmatrix_check_kernel<2, false>, dim3(1), dim3(32), 0, p);
  else if (prim == "ldmatrix_x4") launch(tile_ldmatrix_check_kernel<4, false>, dim3(1), dim3(32), 0, p);
  else if (prim == "ldmatrix_x1_trans") launch(tile_ldmatrix_check_kernel<1, true>, dim3(1), dim3(32), 0, p);
  else if (prim == "ldmatrix_x2_trans") launch(tile_ldmatrix_check_kernel<2, true>, dim3(1), dim3(32), 0, p);
  else if (prim == "ldmatrix_x4_trans") launch(tile_ldmatrix_check_kernel<4, true>, dim3(1), dim3(32), 0, p);
  else TORCH_CHECK(false, "kdkernels.tile_check: unknown prim '", prim, "'");
  return regs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(KDK_LIB, m) {
  m.def("tile_check(Tensor a, Tensor b, Tensor c, str prim, bool bt, int m_valid) -> Tensor");
}
TORCH_LIBRARY_IMPL(KDK_LIB, KDK_DEVICE_KEY, m) { m.impl("tile_check", KDK_IMPL(tile_check_cuda)); }

}  // namespace kdk
