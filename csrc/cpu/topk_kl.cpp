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

// The row through the student's final-logit map (a copy into buf), or the row itself without one.
template <class acc_t>
const acc_t* mapped(const acc_t* x, int64_t V, const LogitMap<acc_t>& map, std::vector<acc_t>& buf) {
  if (!map.active) return x;
  buf.resize(V);
  for (int64_t v = 0; v < V; ++v) buf[v] = map(x[v]);
  return buf.data();
}

// Rows per task: enough work per task to amortise scheduling on short rows.
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1)); }

// One dense row: loss and H = sum_v dD/dlog q_v, summed in double; the teacher in its own dtype.
template <class scalar_t, class teacher_t, class acc_t>
void dense_fwd_row(const TopkArgs& a, const acc_t* x, const teacher_t* yt, std::vector<acc_t>& ybuf, acc_t hi,
                   acc_t lo, acc_t* loss, acc_t* stat) {
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature), param = acc_t(a.param);
  const acc_t t_scale = a.logprobs ? acc_t(1) : inv_t;
  const acc_t* y = as_acc<teacher_t, acc_t>(yt, a.V, ybuf);
  acc_t thi, tlo;
  row_lse_split(y, a.V, t_scale, thi, tlo);
  double total = 0, H = 0;
  for (int64_t v = 0; v < a.V && thi != neg_inf<acc_t>(); ++v) {  // no teacher mass: loss 0
    acc_t lq, l, h;
    dense_bucket<acc_t>(a.div, param, x[v] * inv_t, y[v] * t_scale, hi, lo, thi, tlo, lq, l, h);
    total += l;
    H += h;
  }
  *loss = static_cast<acc_t>(total);
  stat[0] = static_cast<acc_t>(H); stat[2] = thi; stat[3] = tlo;
}

template <class scalar_t, class teacher_t, class acc_t, class index_t>
void fwd_rows(const TopkArgs& a, const scalar_t* logits, int64_t ld, const acc_t* tv_sparse,
              const teacher_t* tv_dense, int64_t ld_t, const index_t* idx, const bool* mask, acc_t* loss,
              acc_t* lse_out, acc_t* coef, acc_t* stat) {
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature), param = acc_t(a.param);
  const int64_t V = a.V, K = a.K;
  const LogitMap<acc_t> map(a.logit_scale, a.softcap);
  at::parallel_for(0, a.N, grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, mbuf, ybuf, lq(K), tv(K);
    SeqReducer r;
    for (int64_t n = begin; n < end; ++n) {
      acc_t* a_row = coef + n * K;
      acc_t* st = stat + n * kTopkStat;
      std::fill(st, st + kTopkStat, acc_t(0));
      if (mask && !mask[n]) {
        loss[n] = 0; lse_out[n] = 0;
        for (int64_t k = 0; k < K; ++k) a_row[k] = 0;
        continue;
      }
      const acc_t* x = mapped(as_acc<scalar_t, acc_t>(logits + n * ld, V, xbuf), V, map, mbuf);
      acc_t hi, lo;
      row_lse_split(x, V, inv_t, hi, lo);
      lse_out[n] = hi; st[1] = lo;
      if (a.mode == kDense) {
        dense_fwd_row<scalar_t, teacher_t, acc_t>(a, x, tv_dense + n * ld_t, ybuf, hi, lo, loss + n, st);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = static_cast<int64_t>(idx[n * K + k]);
        const bool ok = id >= 0 && id < V;
        lq[k] = ok ? (x[id] * inv_t - hi) - lo : neg_inf<acc_t>();
        tv[k] = ok ? tv_sparse[n * K + k] : neg_inf<acc_t>();
      }
      acc_t l, G;
      topk_epilogue<acc_t>(r, static_cast<int>(K), a.mode, a.div, param, inv_t, a.logprobs, lq.data(), tv.data(),
                           a_row, l, G);
      loss[n] = l; st[0] = G;
    }
  });
}

template <class scalar_t, class teacher_t, class acc_t, class index_t>
void bwd_rows(const TopkArgs& a, const acc_t* gl, const scalar_t* logits, int64_t ld, const teacher_t* tv_dense,
              int64_t ld_t, const index_t* idx, const acc_t* lse, const acc_t* coef, const acc_t* stat,
              scalar_t* out, bool inplace) {
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature), param = acc_t(a.param);
  const acc_t t_scale = a.logprobs ? acc_t(1) : inv_t;
  const int64_t V = a.V, K = a.K;
  const LogitMap<acc_t> map(a.logit_scale, a.softcap);
  at::parallel_for(0, a.N, grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, mbuf, ybuf, obuf;
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* o = out + n * V;
      const acc_t* st = stat + n * kTopkStat;
      const acc_t c = gl[n] * inv_t, G = st[0], hi = lse[n], lo = st[1];
      // Masked rows, zero upstream gradients and dense rows without teacher mass get exactly zero.
      if (c == acc_t(0) || (a.mode == kDense && st[2] == neg_inf<acc_t>())) {
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      const acc_t* raw = as_acc<scalar_t, acc_t>(logits + n * ld, V, xbuf);
      if (inplace && raw == reinterpret_cast<const acc_t*>(o)) {  // read the row before it is overwritten
        xbuf.assign(raw, raw + V);
        raw = xbuf.data();
      }
      const acc_t* x = mapped(raw, V, map, mbuf);
      acc_t* ob;  // the row in acc_t: the output itself when the types agree
      if constexpr (std::is_same_v<scalar_t, acc_t>) ob = o; else { obuf.resize(V); ob = obuf.data(); }
      if (a.mode == kDense) {
        const acc_t* y = as_acc<teacher_t, acc_t>(tv_dense + n * ld_t, V, ybuf);
        const acc_t thi = st[2], tlo = st[3];
        for (int64_t v = 0; v < V; ++v) {
          acc_t lq, l, h;
          dense_bucket<acc_t>(a.div, param, x[v] * inv_t, y[v] * t_scale, hi, lo, thi, tlo, lq, l, h);
          ob[v] = c * (h - kexp(lq) * G);
        }
      } else {
        // q_v = exp(x_v / T - hi) exp(-lo): the low part folds into the row's constant.
        if (G == acc_t(0)) std::fill(ob, ob + V, acc_t(0));  // support mode: only S moves
        else row_scaled_exp(x, V, inv_t, hi, -c * G * kexp(-lo), ob);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t id = static_cast<int64_t>(idx[n * K + k]);
          if (id < 0 || id >= V) continue;  // a dropped id: its teacher mass sits in the tail
          ob[id] = c * (coef[n * K + k] - kexp((x[id] * inv_t - hi) - lo) * G);
        }
      }
      if (map.active)  // chain rule through the final-logit map
        for (int64_t v = 0; v < V; ++v) ob[v] *= map.deriv(raw[v]);
      if constexpr (!std::is_same_v<scalar_t, acc_t>)
        for (int64_t v = 0; v < V; ++v) o[v] = static_cast<scalar_t>(ob[v]);
    }
  });
}

// The dense teacher in its own dtype when it is the logits' (no copy), else in the accumulation dtype:
// a float32 teacher beside bf16 logits is never rounded to bf16.
at::Tensor dense_teacher(const at::Tensor& values, const at::Tensor& z, at::ScalarType acc_type) {
  const at::Tensor t = values.scalar_type() == z.scalar_type() ? values : values.to(acc_type);
  return t.stride(1) == 1 ? t : t.contiguous();
}

// Calls f(typed ids pointer) (a null int64 pointer when there are none).
template <class F> void with_ids(const at::Tensor& idx, F f) {
  if (!idx.defined()) f(static_cast<const int64_t*>(nullptr));
  else if (idx.scalar_type() == at::kInt) f(static_cast<const int32_t*>(idx.data_ptr<int32_t>()));
  else f(static_cast<const int64_t*>(idx.data_ptr<int64_t>()));
}

// Calls f(teacher pointer) typed scalar_t or acc_t (dense mode), or a null scalar_t pointer.
template <class scalar_t, class acc_t, class F> void with_teacher(const at::Tensor& tv, F f) {
  if (!tv.defined()) f(static_cast<const scalar_t*>(nullptr));
  else if (tv.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) f(static_cast<const scalar_t*>(tv.data_ptr<scalar_t>()));
  else f(static_cast<const acc_t*>(tv.data_ptr<acc_t>()));
}

// Logits with unit stride along V (rows may be strided, e.g. a slice of a wider tensor).
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cpu(KDK_TOPK_KL_FWD_ARGS) {
  TopkArgs a = topk_kl_parse(logits, values, indices, row_mask, std::string(mode), std::string(divergence),
                                   param, temperature, values_are_logprobs, drop_out_of_range);
  topk_kl_logit_map(a, logit_scale, softcap);
  if (validate && a.mode != kDense) topk_kl_validate_ids(*indices, a.V, a.drop);
  const at::Tensor z = unit_stride_rows(logits);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_type);
  at::Tensor loss = at::empty({a.N}, opts), lse = at::empty({a.N}, opts);
  at::Tensor coef = at::empty({a.N, a.K}, opts), stat = at::empty({a.N, kTopkStat}, opts);
  if (a.N == 0) return {loss, lse, coef, stat};
  const at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  const at::Tensor tv = a.mode == kDense ? dense_teacher(values, z, acc_type) : values.to(acc_type).contiguous();
  const at::Tensor idx = a.mode == kDense ? at::Tensor() : indices->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    with_teacher<scalar_t, acc_t>(a.mode == kDense ? tv : at::Tensor(), [&](auto* td) {
      using teacher_t = std::remove_const_t<std::remove_pointer_t<decltype(td)>>;
      with_ids(idx, [&](auto* ids) {
        using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
        fwd_rows<scalar_t, teacher_t, acc_t, index_t>(
            a, z.data_ptr<scalar_t>(), z.stride(0), a.mode == kDense ? nullptr : tv.data_ptr<acc_t>(), td,
            a.mode == kDense ? tv.stride(0) : 0, ids, m, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
            coef.data_ptr<acc_t>(), stat.data_ptr<acc_t>());
      });
    });
  });
  return {loss, lse, coef, stat};
}

namespace {

// The backward into `out` ((N, V) contiguous): a new tensor, or the logits themselves (in place).
void bwd_into(const TopkArgs& a, const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& values,
              const c10::optional<at::Tensor>& indices, const at::Tensor& lse, const at::Tensor& coef,
              const at::Tensor& stat, at::Tensor& out, bool inplace) {
  if (a.N == 0) return;
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gl = grad_loss.to(acc_type).contiguous(), lse_c = lse.contiguous(), coef_c = coef.contiguous(),
                   stat_c = stat.contiguous();
  const at::Tensor tv = a.mode == kDense ? dense_teacher(values, z, acc_type) : at::Tensor();
  const at::Tensor idx = a.mode == kDense ? at::Tensor() : indices->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_kl_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_teacher<scalar_t, acc_t>(tv, [&](auto* td) {
      using teacher_t = std::remove_const_t<std::remove_pointer_t<decltype(td)>>;
      with_ids(idx, [&](auto* ids) {
        using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
        bwd_rows<scalar_t, teacher_t, acc_t, index_t>(a, gl.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), z.stride(0), td,
                                                      tv.defined() ? tv.stride(0) : 0, ids, lse_c.data_ptr<acc_t>(),
                                                      coef_c.data_ptr<acc_t>(), stat_c.data_ptr<acc_t>(),
                                                      out.data_ptr<scalar_t>(), inplace);
      });
    });
  });
}

}  // namespace

at::Tensor topk_kl_bwd_cpu(KDK_TOPK_KL_BWD_ARGS) {
  // The options were checked by the forward; parse again for the raw op's direct users.
  TopkArgs a = topk_kl_parse(logits, values, indices, c10::nullopt, std::string(mode), std::string(divergence),
                             param, temperature, values_are_logprobs, true);
  topk_kl_logit_map(a, logit_scale, softcap);
  topk_kl_check_saved(a, logits, grad_loss, lse, coef, stat);
  const at::Tensor z = unit_stride_rows(logits);
  at::Tensor out = at::empty({a.N, a.V}, z.options());
  bwd_into(a, grad_loss, z, values, indices, lse, coef, stat, out, false);
  return out;
}

void topk_kl_bwd_inplace_cpu(KDK_TOPK_KL_BWD_INPLACE_ARGS) {
  TopkArgs a = topk_kl_parse(logits, values, indices, c10::nullopt, std::string(mode), std::string(divergence),
                             param, temperature, values_are_logprobs, true);
  topk_kl_logit_map(a, logit_scale, softcap);
  topk_kl_check_saved(a, logits, grad_loss, lse, coef, stat);
  topk_kl_check_inplace(logits);
  at::Tensor out = logits;
  bwd_into(a, grad_loss, logits, values, indices, lse, coef, stat, out, true);
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("topk_kl_fwd", &topk_kl_fwd_cpu);
  m.impl("topk_kl_bwd", &topk_kl_bwd_cpu);
  m.impl("topk_kl_bwd_inplace", &topk_kl_bwd_inplace_cpu);
}

}  // namespace kdk
