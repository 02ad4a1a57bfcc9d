// CPU implementation of the fused top-k KL ops: rows in parallel, vectorised exps, no N x V temporaries.
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_math.h"
#include "common/topk_kl_args.h"
#include "common/topk_kl_math.h"
#include "ops.h"

namespace kdk {
namespace {

// A row as acc_t: the row itself when the types agree, else converted into buf (one pass).
template <class scalar_t, class acc_t>
const acc_t* as_acc(const scalar_t* z, int64_t V, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return z;
  } else {
    buf.resize(V);
    for (int64_t v = 0; v < V; ++v) buf[v] = static_cast<acc_t>(z[v]);
    return buf.data();
  }
}

// Rows per task: enough work per task to amortise scheduling on short rows.
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1)); }

template <class scalar_t, class acc_t, class index_t>
void fwd_rows(const TopkArgs& a, const scalar_t* logits, int64_t ld, const acc_t* tv_sparse,
              const scalar_t* tv_dense, int64_t ld_t, const index_t* idx, const bool* mask, acc_t* loss,
              acc_t* lse_out, acc_t* coef, acc_t* stat) {
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature), param = acc_t(a.param);
  const acc_t t_scale = a.logprobs ? acc_t(1) : inv_t;
  const int64_t V = a.V, K = a.K;
  at::parallel_for(0, a.N, grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf, lq(K), tv(K);
    SeqReducer r;
    for (int64_t n = begin; n < end; ++n) {
      acc_t* a_row = coef + n * K;
      if (mask && !mask[n]) {
        loss[n] = 0; lse_out[n] = 0; stat[2 * n] = 0; stat[2 * n + 1] = 0;
        for (int64_t k = 0; k < K; ++k) a_row[k] = 0;
        continue;
      }
      const acc_t* x = as_acc<scalar_t, acc_t>(logits + n * ld, V, xbuf);
      const acc_t lse = row_lse(x, V, inv_t);
      lse_out[n] = lse;
      if (a.mode == kDense) {
        const acc_t* y = as_acc<scalar_t, acc_t>(tv_dense + n * ld_t, V, ybuf);
        const acc_t lse_t = row_lse(y, V, t_scale);
        acc_t total = 0, H = 0;
        for (int64_t v = 0; v < V && lse_t != neg_inf<acc_t>(); ++v) {  // no teacher mass: loss 0
          acc_t l, h;
          bucket<acc_t>(a.div, param, y[v] * t_scale - lse_t, x[v] * inv_t - lse, l, h);
          total += l;
          H += h;
        }
        loss[n] = total; stat[2 * n] = H; stat[2 * n + 1] = lse_t;
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = static_cast<int64_t>(idx[n * K + k]);
        const bool ok = id >= 0 && id < V;
        lq[k] = ok ? x[id] * inv_t - lse : neg_inf<acc_t>();
        tv[k] = ok ? tv_sparse[n * K + k] : neg_inf<acc_t>();
      }
      acc_t l, G;
      topk_epilogue<acc_t>(r, static_cast<int>(K), a.mode, a.div, param, inv_t, a.logprobs, lq.data(), tv.data(),
                           a_row, l, G);
      loss[n] = l; stat[2 * n] = G; stat[2 * n + 1] = 0;
    }
  });
}

template <class scalar_t, class acc_t, class index_t>
void bwd_rows(const TopkArgs& a, const acc_t* gl, const scalar_t* logits, int64_t ld, const scalar_t* tv_dense,
              int64_t ld_t, const index_t* idx, const acc_t* lse, const acc_t* coef, const acc_t* stat,
              scalar_t* out) {
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature), param = acc_t(a.param);
  const acc_t t_scale = a.logprobs ? acc_t(1) : inv_t;
  const int64_t V = a.V, K = a.K;
  at::parallel_for(0, a.N, grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf, obuf;
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* o = out + n * V;
      const acc_t c = gl[n] * inv_t, G = stat[2 * n];
      // Masked rows, zero upstream gradients and dense rows without teacher mass get exactly zero.
      if (c == acc_t(0) || (a.mode == kDense && stat[2 * n + 1] == neg_inf<acc_t>())) {
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      const acc_t* x = as_acc<scalar_t, acc_t>(logits + n * ld, V, xbuf);
      acc_t* ob;  // the row in acc_t: the output itself when the types agree
      if constexpr (std::is_same_v<scalar_t, acc_t>) ob = o; else { obuf.resize(V); ob = obuf.data(); }
      if (a.mode == kDense) {
        const acc_t* y = as_acc<scalar_t, acc_t>(tv_dense + n * ld_t, V, ybuf);
        const acc_t lse_t = stat[2 * n + 1];
        for (int64_t v = 0; v < V; ++v) {
          const acc_t lq = x[v] * inv_t - lse[n];
          acc_t l, h;
          bucket<acc_t>(a.div, param, y[v] * t_scale - lse_t, lq, l, h);
          ob[v] = c * (h - fast_exp(lq) * G);
        }
      } else {
        if (G == acc_t(0)) std::fill(ob, ob + V, acc_t(0));  // support mode: only S moves
        else row_scaled_exp(x, V, inv_t, lse[n], -c * G, ob);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t id = static_cast<int64_t>(idx[n * K + k]);
          if (id < 0 || id >= V) continue;  // a dropped id: its teacher mass sits in the tail
          ob[id] = c * (coef[n * K + k] - fast_exp(x[id] * inv_t - lse[n]) * G);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>)
        for (int64_t v = 0; v < V; ++v) o[v] = static_cast<scalar_t>(ob[v]);
    }
  });
}

// Logits with unit stride along V (rows may be strided, e.g. a slice of a wider tensor).
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cpu(KDK_TOPK_KL_FWD_ARGS) {
  const TopkArgs a = topk_kl_parse(logits, values, indices, row_mask, std::string(mode), std::string(divergence),
                                   param, temperature, values_are_logprobs, drop_out_of_range);
  if (validate && a.mode != kDense) topk_kl_validate_ids(*indices, a.V, a.drop);
  const at::Tensor z = unit_stride_rows(logits);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_type);
  at::Tensor loss = at::empty({a.N}, opts), lse = at::empty({a.N}, opts);
  at::Tensor coef = at::empty({a.N, a.K}, opts), stat = at::empty({a.N, 2}, opts);
  if (a.N == 0) return {loss, lse, coef, stat};
  const at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  const at::Tensor tv = a.mode == kDense ? unit_stride_rows(values.to(z.scalar_type())) : values.to(acc_type).contiguous();
  const at::Tensor idx = a.mode == kDense ? at::Tensor() : indices->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    auto run = [&](auto* ids) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      fwd_rows<scalar_t, acc_t, index_t>(
          a, z.data_ptr<scalar_t>(), z.stride(0), a.mode == kDense ? nullptr : tv.data_ptr<acc_t>(),
          a.mode == kDense ? tv.data_ptr<scalar_t>() : nullptr, a.mode == kDense ? tv.stride(0) : 0, ids, m,
          loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), stat.data_ptr<acc_t>());
    };
    if (!idx.defined()) run(static_cast<const int64_t*>(nullptr));
    else if (idx.scalar_type() == at::kInt) run(static_cast<const int32_t*>(idx.data_ptr<int32_t>()));
    else run(static_cast<const int64_t*>(idx.data_ptr<int64_t>()));
  });
  return {loss, lse, coef, stat};
}

at::Tensor topk_kl_bwd_cpu(KDK_TOPK_KL_BWD_ARGS) {
  // The options were checked by the forward; parse again for the raw op's direct users.
  const TopkArgs a = topk_kl_parse(logits, values, indices, c10::nullopt, std::string(mode), std::string(divergence),
                                   param, temperature, values_are_logprobs, true);
  topk_kl_check_saved(a, logits, grad_loss, lse, coef, stat);
  const at::Tensor z = unit_stride_rows(logits);
  at::Tensor out = at::empty({a.N, a.V}, z.options());
  if (a.N == 0) return out;
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gl = grad_loss.to(acc_type).contiguous(), lse_c = lse.contiguous(), coef_c = coef.contiguous(),
                   stat_c = stat.contiguous();
  const at::Tensor tv = a.mode == kDense ? unit_stride_rows(values.to(z.scalar_type())) : at::Tensor();
  const at::Tensor idx = a.mode == kDense ? at::Tensor() : indices->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto run = [&](auto* ids) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      bwd_rows<scalar_t, acc_t, index_t>(a, gl.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), z.stride(0),
                                         tv.defined() ? tv.data_ptr<scalar_t>() : nullptr, tv.defined() ? tv.stride(0) : 0,
                                         ids, lse_c.data_ptr<acc_t>(), coef_c.data_ptr<acc_t>(), stat_c.data_ptr<acc_t>(),
                                         out.data_ptr<scalar_t>());
    };
    if (!idx.defined()) run(static_cast<const int64_t*>(nullptr));
    else if (idx.scalar_type() == at::kInt) run(static_cast<const int32_t*>(idx.data_ptr<int32_t>()));
    else run(static_cast<const int64_t*>(idx.data_ptr<int64_t>()));
  });
  return out;
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("topk_kl_fwd", &topk_kl_fwd_cpu);
  m.impl("topk_kl_bwd", &topk_kl_bwd_cpu);
}

}  // namespace kdk
