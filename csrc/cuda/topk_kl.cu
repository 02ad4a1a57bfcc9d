// CUDA launchers of the fused top-k KL ops: checks, device guard, params, dtype dispatch, launch.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/launch.h"
#include "common/topk_kl_args.h"
#include "kernels/topk_kl.cuh"
#include "ops.h"

namespace kdk {
namespace {

int threads_for(int64_t V) { return V >= 16384 ? 512 : (V >= 2048 ? 256 : 128); }
int64_t blocks_for(int64_t N) { return std::min<int64_t>(N, int64_t(1) << 30); }
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Calls f(ids pointer typed int32/int64).
template <class F> void with_ids(const at::Tensor& idx, F f) {
  if (idx.scalar_type() == at::kInt) f(static_cast<const int32_t*>(idx.data_ptr<int32_t>()));
  else f(static_cast<const int64_t*>(idx.data_ptr<int64_t>()));
}

// Calls f(p) with dense-mode params whose teacher is read in its own dtype when it is the logits' (no
// copy), else in the accumulation dtype: a float32 teacher beside bf16 logits is never rounded to bf16.
// fill(p) sets the other fields.
template <class scalar_t, class acc_t, class Fill, class F>
void with_dense_params(const at::Tensor& values, const at::Tensor& z, Fill fill, F f) {
  const bool own = values.scalar_type() == z.scalar_type();
  const at::Tensor tv = unit_stride_rows(own ? values : values.to(c10::CppTypeToScalarType<acc_t>::value));
  auto run = [&](auto* td) {
    TopkParams<scalar_t, acc_t, int64_t, std::remove_pointer_t<decltype(td)>> p{};
    fill(p);
    p.tdense = td;
    p.ld_t = tv.stride(0);
    f(p);
  };
  if (own) run(tv.data_ptr<scalar_t>());
  else run(tv.data_ptr<acc_t>());
}

// The fields both kernels of a direction share.
template <class P> void fill_common(P& p, const TopkArgs& a, const at::Tensor& z) {
  p.N = a.N; p.V = a.V; p.ld = z.stride(0);
  p.K = static_cast<int>(a.K); p.mode = a.mode; p.div = a.div; p.logprobs = a.logprobs;
  p.param = static_cast<decltype(p.param)>(a.param);
  p.inv_t = static_cast<decltype(p.inv_t)>(1.0 / a.temperature);
  p.logit_scale = a.logit_scale;
  p.softcap = a.softcap;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cuda(KDK_TOPK_KL_FWD_ARGS) {
  TopkArgs a = topk_kl_parse(logits, values, indices, row_mask, std::string(mode), std::string(divergence),
                                   param, temperature, values_are_logprobs, drop_out_of_range);
  topk_kl_logit_map(a, logit_scale, softcap);
  const DeviceGuard guard(logits.device());
  if (validate && a.mode != kDense) topk_kl_validate_ids(*indices, a.V, a.drop);
  const at::Tensor z = unit_stride_rows(logits);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_type);
  at::Tensor loss = at::empty({a.N}, opts), lse = at::empty({a.N}, opts);
  at::Tensor coef = at::empty({a.N, a.K}, opts), stat = at::empty({a.N, kTopkStat}, opts);
  if (a.N == 0) return {loss, lse, coef, stat};
  const at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  const int threads = threads_for(a.V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto outputs = [&](auto& p) {
      p.logits = z.data_ptr<scalar_t>();
      p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      p.loss = loss.data_ptr<acc_t>();
      p.lse = lse.data_ptr<acc_t>();
      p.coef = coef.data_ptr<acc_t>();
      p.stat = stat.data_ptr<acc_t>();
      fill_common(p, a, z);
    };
    if (a.mode == kDense) {
      with_dense_params<scalar_t, acc_t>(values, z, outputs, [&](auto& p) {
        using teacher_t = typename std::remove_reference_t<decltype(p)>::teacher_type;
        launch(topk_kl_dense_fwd_kernel<scalar_t, acc_t, teacher_t>, blocks_for(a.N), threads, 33 * sizeof(double), p);
      });
      return;
    }
    // Epilogue scratch (2K values) in shared memory while it fits the default 48 KB, else in global memory.
    size_t smem = 33 * sizeof(acc_t);
    at::Tensor ws;
    const size_t need = 2 * size_t(a.K) * sizeof(acc_t);
    if (smem + need <= 48 * 1024) smem += need;
    else ws = at::empty({a.N, 2 * a.K}, opts);
    const at::Tensor tv = values.to(acc_type).contiguous(), idx = indices->contiguous();
    with_ids(idx, [&](auto* ids) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      TopkParams<scalar_t, acc_t, index_t, scalar_t> p{};
      outputs(p);
      p.tv = tv.data_ptr<acc_t>();
      p.idx = ids;
      p.workspace = ws.defined() ? ws.data_ptr<acc_t>() : nullptr;
      launch(topk_kl_fwd_kernel<scalar_t, acc_t, index_t>, blocks_for(a.N), threads, smem, p);
    });
  });
  return {loss, lse, coef, stat};
}

namespace {

// The backward into `out` ((N, V) contiguous): a new tensor, or the logits themselves (in place; the support
// logits are then gathered first, since the row is overwritten before the K support entries are written).
void bwd_into(const TopkArgs& a, const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& values,
              const c10::optional<at::Tensor>& indices, const at::Tensor& lse, const at::Tensor& coef,
              const at::Tensor& stat, at::Tensor& out, bool inplace) {
  if (a.N == 0) return;
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gl = grad_loss.to(acc_type).contiguous(), lse_c = lse.contiguous(), coef_c = coef.contiguous(),
                   stat_c = stat.contiguous();
  const at::Tensor idx = a.mode == kDense ? at::Tensor() : indices->contiguous();
  const at::Tensor zs = inplace && idx.defined() ? z.gather(1, idx.clamp(0, a.V - 1).to(at::kLong)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto inputs = [&](auto& p) {
      p.logits = z.data_ptr<scalar_t>();
      p.grad_loss = gl.data_ptr<acc_t>();
      p.lse = lse_c.data_ptr<acc_t>();
      p.coef = coef_c.data_ptr<acc_t>();
      p.stat = stat_c.data_ptr<acc_t>();
      p.grad = out.data_ptr<scalar_t>();
      fill_common(p, a, z);
    };
    if (a.mode == kDense) {
      with_dense_params<scalar_t, acc_t>(values, z, inputs, [&](auto& p) {
        using teacher_t = typename std::remove_reference_t<decltype(p)>::teacher_type;
        launch(topk_kl_dense_bwd_kernel<scalar_t, acc_t, teacher_t>, blocks_for(a.N), threads_for(a.V), 0, p);
      });
      return;
    }
    with_ids(idx, [&](auto* ids) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      TopkParams<scalar_t, acc_t, index_t, scalar_t> p{};
      inputs(p);
      p.idx = ids;
      p.zs = zs.defined() ? zs.data_ptr<scalar_t>() : nullptr;
      launch(topk_kl_bwd_kernel<scalar_t, acc_t, index_t>, blocks_for(a.N), threads_for(a.V), 0, p);
    });
  });
}

}  // namespace

at::Tensor topk_kl_bwd_cuda(KDK_TOPK_KL_BWD_ARGS) {
  TopkArgs a = topk_kl_parse(logits, values, indices, c10::nullopt, std::string(mode), std::string(divergence),
                             param, temperature, values_are_logprobs, true);
  topk_kl_logit_map(a, logit_scale, softcap);
  topk_kl_check_saved(a, logits, grad_loss, lse, coef, stat);
  const DeviceGuard guard(logits.device());
  const at::Tensor z = unit_stride_rows(logits);
  at::Tensor out = at::empty({a.N, a.V}, z.options());
  bwd_into(a, grad_loss, z, values, indices, lse, coef, stat, out, false);
  return out;
}

void topk_kl_bwd_inplace_cuda(KDK_TOPK_KL_BWD_INPLACE_ARGS) {
  TopkArgs a = topk_kl_parse(logits, values, indices, c10::nullopt, std::string(mode), std::string(divergence),
                             param, temperature, values_are_logprobs, true);
  topk_kl_logit_map(a, logit_scale, softcap);
  topk_kl_check_saved(a, logits, grad_loss, lse, coef, stat);
  topk_kl_check_inplace(logits);
  const DeviceGuard guard(logits.device());
  at::Tensor out = logits;
  bwd_into(a, grad_loss, logits, values, indices, lse, coef, stat, out, true);
}

TORCH_LIBRARY_IMPL(KDK_LIB, KDK_DEVICE_KEY, m) {
  m.impl("topk_kl_fwd", KDK_IMPL(topk_kl_fwd_cuda));
  m.impl("topk_kl_bwd", KDK_IMPL(topk_kl_bwd_cuda));
  m.impl("topk_kl_bwd_inplace", KDK_IMPL(topk_kl_bwd_inplace_cuda));
}

}  // namespace kdk
