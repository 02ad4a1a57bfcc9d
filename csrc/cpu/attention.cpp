// CPU implementation of the attention ops (docs/shared_attention.md): blocks of query rows in parallel; each
// block's scores against the keys it can see are one GEMM (at::mm on the block, never a T x T tensor), the
// softmax is a vectorised pass over that row block, and the output / gradients are GEMMs again.
//
// Rows of a block see every key at once (a CPU block of 64 rows x Tk keys fits in cache), so the forward
// needs no online rescaling; causal blocks stop at the last key their last row can see.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/attention_args.h"
#include "common/checks.h"
#include "common/cpu_math.h"
#include "ops.h"

namespace kdk {
namespace {

constexpr int64_t kRows = 64;  // query rows per block

// s[j] = exp(s[j] - shift), exactly 0 where s[j] is -inf (masked).
template <class T> KDK_CPU_CLONES void exp_shift_masked(T* s, int64_t n, T shift) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const f8 ninf = splat8(neg_inf<float>()), zero = splat8(0.f);
    for (; i + 8 <= n; i += 8) {
      const f8 x = load8(s + i);
      const f8 e = exp8(x - shift);
      store8(s + i, x > ninf ? e : zero);
    }
  }
  for (; i < n; ++i) s[i] = s[i] == neg_inf<T>() ? T(0) : fast_exp(s[i] - shift);
}

// A (b, h) slice of the (B, H, Tq, Tk) bool mask, with its row and column strides.
struct MaskRows {
  const bool* p = nullptr;
  int64_t sq = 0, sk = 0;
};

MaskRows mask_rows(const at::Tensor& mask, int64_t b, int64_t h) {
  MaskRows m;
  if (!mask.defined()) return m;
  m.p = mask.data_ptr<bool>() + b * mask.stride(0) + h * mask.stride(1);
  m.sq = mask.stride(2);
  m.sk = mask.stride(3);
  return m;
}

// The keys a block of rows [r0, r0 + m) can see: [0, kend).
int64_t keys_end(const AttnArgs& a, int64_t r0, int64_t m) {
  if (!a.causal) return a.Tk;
  return std::clamp<int64_t>(r0 + m + a.off, 0, a.Tk);
}

// Scale one row of scores and set the entries of masked keys (mask, causal, j >= n) to -inf.
template <class T>
void mask_row(T* s, int64_t n, int64_t i, const AttnArgs& a, const MaskRows& m, T scale) {
  for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  if (a.causal) {
    const int64_t last = i + a.off;  // the last key row i sees
    for (int64_t j = std::max<int64_t>(last + 1, 0); j < n; ++j) s[j] = neg_inf<T>();
  }
  if (m.p) {
    const bool* mr = m.p + i * m.sq;
    for (int64_t j = 0; j < n; ++j)
      if (!mr[j * m.sk]) s[j] = neg_inf<T>();
  }
}

// Scores of rows [r0, r0 + m) against keys [0, n) turned into probabilities, in place: exp(s - lse) with
// lse either given (lse_in, one per row) or computed (then written to lse_out). Rows without a visible key
// get lse = -inf and probabilities 0.
template <class T>
void probs_rows(T* S, int64_t m, int64_t n, int64_t r0, const AttnArgs& a, const MaskRows& mr, const T* lse_in,
                T* lse_out) {
  const T scale = static_cast<T>(a.scale);
  for (int64_t r = 0; r < m; ++r) {
    T* s = S + r * n;
    mask_row(s, n, r0 + r, a, mr, scale);
    const T lse = lse_in ? lse_in[r] : row_lse(s, n, T(1));
    if (lse_out) lse_out[r] = lse;
    if (lse == neg_inf<T>()) std::fill(s, s + n, T(0));
    else exp_shift_masked(s, n, lse);
  }
}

at::Tensor acc_contig(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// The forward of attention (lse_in undefined: softmax statistics computed) and of shared attention in
// recompute mode (lse_in given). Returns out (B, H, Tq, Dv) in q's dtype and the lse (B, H, Tq).
std::tuple<at::Tensor, at::Tensor> forward_impl(const AttnArgs& a, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& lse_in,
                                                const c10::optional<at::Tensor>& mask) {
  const auto opts = q.options().dtype(a.acc);
  at::Tensor out = at::empty({a.B, a.H, a.Tq, a.Dv}, opts);
  at::Tensor lse = lse_in.defined() ? lse_in : at::empty({a.B, a.H, a.Tq}, opts);
  if (out.numel() == 0 && lse.numel() == 0) return {out.to(q.scalar_type()), lse};
  const at::Tensor qa = q.to(a.acc), ka = k.to(a.acc), va = v.to(a.acc);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
  const int64_t nblk = (a.Tq + kRows - 1) / kRows;
  AT_DISPATCH_FLOATING_TYPES(a.acc, "attention_fwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, a.B * a.H * nblk, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: OpenMP workers start with it on
      for (int64_t task = begin; task < end; ++task) {
        const int64_t blk = task % nblk, bh = task / nblk, b = bh / a.H, h = bh % a.H, hk = h / a.group;
        const int64_t r0 = blk * kRows, rows = std::min(kRows, a.Tq - r0), kend = keys_end(a, r0, rows);
        at::Tensor o = out[b][h].narrow(0, r0, rows);
        T* lse_rows = lse_c.data_ptr<T>() + (b * a.H + h) * a.Tq + r0;
        if (kend == 0) {
          o.zero_();
          if (!lse_in.defined()) std::fill(lse_rows, lse_rows + rows, neg_inf<T>());
          continue;
        }
        at::Tensor S = at::mm(qa[b][h].narrow(0, r0, rows), ka[b][hk].narrow(0, 0, kend).t()).contiguous();
        probs_rows<T>(S.data_ptr<T>(), rows, kend, r0, a, mask_rows(m, b, h), lse_in.defined() ? lse_rows : nullptr,
                      lse_in.defined() ? nullptr : lse_rows);
        at::mm_out(o, S, va[b][hk].narrow(0, 0, kend));
      }
    });
  });
  return {out.to(q.scalar_type()), lse_c};
}

// The backward shared by attention and shared attention: P = exp(scale q k^T - lse) recomputed per block,
// dV = P^T dO, dS = P (dO V^T - D) with D = rowsum(dO * O), dQ = scale dS K, dK = scale dS^T Q.
// Parallel over (batch, key/value head); the query heads of a group run in order, so dK/dV need no atomics.
// grad_qk / grad_v: whether dQ, dK / dV are wanted (an EchoAtt group's backward needs no dV here).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const AttnArgs& a, const at::Tensor& grad_out,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse,
                                                             const c10::optional<at::Tensor>& mask, bool grad_qk,
                                                             bool grad_v = true) {
  const auto opts = q.options().dtype(a.acc);
  at::Tensor dq = grad_qk ? at::zeros({a.B, a.H, a.Tq, a.D}, opts) : at::empty({0}, q.options());
  at::Tensor dk = grad_qk ? at::zeros({a.B, a.Hk, a.Tk, a.D}, opts) : at::empty({0}, q.options());
  at::Tensor dv = grad_v ? at::zeros({a.B, a.Hk, a.Tk, a.Dv}, opts) : at::empty({0}, q.options());
  if (a.B * a.H * a.Tq > 0 && a.Tk > 0) {
    const at::Tensor qa = q.to(a.acc), ka = k.to(a.acc), va = v.to(a.acc);
    const at::Tensor go = acc_contig(grad_out, a.acc), oa = acc_contig(out, a.acc), lse_c = lse.contiguous();
    const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(a.acc, "attention_bwd_cpu", [&] {
      using T = scalar_t;
      at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: OpenMP workers start with it on
        std::vector<T> delta(kRows);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / a.Hk, hk = task % a.Hk;
          for (int64_t t = 0; t < a.group; ++t) {
            const int64_t h = hk * a.group + t;
            for (int64_t r0 = 0; r0 < a.Tq; r0 += kRows) {
              const int64_t rows = std::min(kRows, a.Tq - r0), kend = keys_end(a, r0, rows);
              if (kend == 0) continue;
              const at::Tensor qb = qa[b][h].narrow(0, r0, rows), kk = ka[b][hk].narrow(0, 0, kend);
              const at::Tensor vv = va[b][hk].narrow(0, 0, kend);
              const at::Tensor gb = go[b][h].narrow(0, r0, rows);
              at::Tensor P = at::mm(qb, kk.t()).contiguous();
              const T* lse_rows = lse_c.data_ptr<T>() + (b * a.H + h) * a.Tq + r0;
              probs_rows<T>(P.data_ptr<T>(), rows, kend, r0, a, mask_rows(m, b, h), lse_rows, nullptr);
              if (grad_v) dv[b][hk].narrow(0, 0, kend).addmm_(P.t(), gb);
              if (!grad_qk) continue;
              at::Tensor dS = at::mm(gb, vv.t()).contiguous();  // dP
              const T* g = gb.data_ptr<T>();
              const T* o = oa.data_ptr<T>() + ((b * a.H + h) * a.Tq + r0) * a.Dv;
              for (int64_t r = 0; r < rows; ++r) {
                T d = 0;
                for (int64_t c = 0; c < a.Dv; ++c) d += g[r * a.Dv + c] * o[r * a.Dv + c];
                delta[r] = d;
              }
              T* ds = dS.data_ptr<T>();
              const T* p = P.data_ptr<T>();
              for (int64_t r = 0; r < rows; ++r)
                for (int64_t j = 0; j < kend; ++j) ds[r * kend + j] = p[r * kend + j] * (ds[r * kend + j] - delta[r]);
              dk[b][hk].narrow(0, 0, kend).addmm_(dS.t(), qb, 1, a.scale);
              at::Tensor dqb = dq[b][h].narrow(0, r0, rows);
              at::mm_out(dqb, dS, kk);
              dqb.mul_(a.scale);
            }
          }
        }
      });
    });
  }
  const auto dt = q.scalar_type();
  return {grad_qk ? dq.to(dt) : dq, grad_qk ? dk.to(dt) : dk, grad_v ? dv.to(dt) : dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(KDK_ATTENTION_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kAttentionNames, q, k, &v, nullptr, mask, causal, scale);
  return forward_impl(a, q, k, v, at::Tensor(), mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(KDK_ATTENTION_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kAttentionNames, q, k, &v, &lse, mask, causal, scale);
  attention_check_grad(kAttentionNames, a, grad_out, out, q);
  return backward_impl(a, grad_out, q, k, v, out, lse, mask, true);
}

at::Tensor shared_attention_fwd_cpu(KDK_SHARED_ATTENTION_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, &v, &lse, mask, causal, scale);
  return std::get<0>(forward_impl(a, q, k, v, lse, mask));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_attention_bwd_cpu(KDK_SHARED_ATTENTION_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, &v, &lse, mask, causal, scale);
  attention_check_grad(kSharedNames, a, grad_out, out, q);
  return backward_impl(a, grad_out, q, k, v, out, lse, mask, grad_qk);
}

// The layers side by side along the value dimension: one backward with V = [V_1 .. V_L] and dO = [dO_1 .. dO_L]
// has dP = sum_l dO_l V_l^T and delta = sum_l rowsum(dO_l O_l), hence the group's dS, dQ and dK (each layer's
// dV comes from its own backward, so none is formed here).
std::tuple<at::Tensor, at::Tensor> shared_attention_group_bwd_cpu(KDK_SHARED_ATTENTION_GROUP_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  AttnArgs a = shared_group_parse(grad_out, q, k, lse, v, out, mask, causal, scale);
  const int64_t L = v.size(0);
  auto side_by_side = [L](const at::Tensor& t) {  // (L, B, h, T, Dv) -> (B, h, T, L * Dv)
    return t.permute({1, 2, 3, 0, 4}).reshape({t.size(1), t.size(2), t.size(3), L * t.size(4)});
  };
  a.Dv *= L;
  auto grads =
      backward_impl(a, side_by_side(grad_out), q, k, side_by_side(v), side_by_side(out), lse, mask, true, false);
  return {std::get<0>(grads), std::get<1>(grads)};
}

at::Tensor shared_attention_probs_fwd_cpu(KDK_SHARED_ATTENTION_PROBS_FWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const AttnArgs a = attention_parse(kSharedNames, q, k, nullptr, &lse, mask, causal, scale);
  at::Tensor P = at::zeros({a.B, a.H, a.Tq, a.Tk}, q.options().dtype(a.acc));
  if (P.numel() == 0) return P.to(q.scalar_type());
  const at::Tensor qa = q.to(a.acc), ka = k.to(a.acc), lse_c = lse.contiguous();
  const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
  const int64_t nblk = (a.Tq + kRows - 1) / kRows;
  AT_DISPATCH_FLOATING_TYPES(a.acc, "shared_attention_probs_fwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, a.B * a.H * nblk, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: OpenMP workers start with it on
      for (int64_t task = begin; task < end; ++task) {
        const int64_t blk = task % nblk, bh = task / nblk, b = bh / a.H, h = bh % a.H, hk = h / a.group;
        const int64_t r0 = blk * kRows, rows = std::min(kRows, a.Tq - r0), kend = keys_end(a, r0, rows);
        if (kend == 0) continue;
        at::Tensor S = at::mm(qa[b][h].narrow(0, r0, rows), ka[b][hk].narrow(0, 0, kend).t()).contiguous();
        const T* lse_rows = lse_c.data_ptr<T>() + (b * a.H + h) * a.Tq + r0;
        probs_rows<T>(S.data_ptr<T>(), rows, kend, r0, a, mask_rows(m, b, h), lse_rows, nullptr);
        T* dst = P.data_ptr<T>() + ((b * a.H + h) * a.Tq + r0) * a.Tk;
        const T* src = S.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) std::copy(src + r * kend, src + (r + 1) * kend, dst + r * a.Tk);
      }
    });
  });
  return P.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> shared_attention_probs_bwd_cpu(KDK_SHARED_ATTENTION_PROBS_BWD_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  // The probabilities carry the mask (0 where masked), so the backward needs neither mask nor lse.
  AttnArgs a = attention_parse(kSharedNames, q, k, nullptr, nullptr, c10::nullopt, false, scale);
  attention_check_probs(a, grad_probs, probs, q);
  const auto opts = q.options().dtype(a.acc);
  at::Tensor dq = at::zeros({a.B, a.H, a.Tq, a.D}, opts), dk = at::zeros({a.B, a.Hk, a.Tk, a.D}, opts);
  if (a.B * a.H * a.Tq > 0 && a.Tk > 0) {
    const at::Tensor qa = q.to(a.acc), ka = k.to(a.acc);
    const at::Tensor G = acc_contig(grad_probs, a.acc), P = acc_contig(probs, a.acc);
    AT_DISPATCH_FLOATING_TYPES(a.acc, "shared_attention_probs_bwd_cpu", [&] {
      using T = scalar_t;
      at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: OpenMP workers start with it on
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / a.Hk, hk = task % a.Hk;
          const at::Tensor kk = ka[b][hk];
          for (int64_t t = 0; t < a.group; ++t) {
            const int64_t h = hk * a.group + t;
            for (int64_t r0 = 0; r0 < a.Tq; r0 += kRows) {
              const int64_t rows = std::min(kRows, a.Tq - r0);
              at::Tensor dS = at::empty({rows, a.Tk}, opts);
              const T* g = G.data_ptr<T>() + ((b * a.H + h) * a.Tq + r0) * a.Tk;
              const T* p = P.data_ptr<T>() + ((b * a.H + h) * a.Tq + r0) * a.Tk;
              T* ds = dS.data_ptr<T>();
              for (int64_t r = 0; r < rows; ++r) {
                T d = 0;
                for (int64_t j = 0; j < a.Tk; ++j) d += g[r * a.Tk + j] * p[r * a.Tk + j];
                for (int64_t j = 0; j < a.Tk; ++j) ds[r * a.Tk + j] = p[r * a.Tk + j] * (g[r * a.Tk + j] - d);
              }
              const at::Tensor qb = qa[b][h].narrow(0, r0, rows);
              dk[b][hk].addmm_(dS.t(), qb, 1, a.scale);
              at::Tensor dqb = dq[b][h].narrow(0, r0, rows);
              at::mm_out(dqb, dS, kk);
              dqb.mul_(a.scale);
            }
          }
        }
      });
    });
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type())};
}

at::Tensor attention_similarity_cpu(KDK_ATTENTION_SIMILARITY_ARGS) {
  const at::NoGradGuard no_grad;  // internal ATen calls never record a graph (raw-op callers)
  const SimArgs a = attention_similarity_parse(qs, ks, mask, causal, scale, std::string(metric));
  const int64_t L = a.L, npairs = L * (L + 1) / 2;
  constexpr int64_t R = 16;  // query rows per task
  const int64_t nblk = (a.Tq + R - 1) / R, ntasks = a.B * a.H * nblk;
  // Per task: the sum over its valid rows of each pair's similarity, then the number of valid rows.
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(ntasks, 1)) * (npairs + 1), 0.0);
  if (ntasks > 0 && a.Tk > 0) {
    const at::Tensor qa = qs.to(a.acc), ka = ks.to(a.acc);
    const at::Tensor m = mask.has_value() ? *mask : at::Tensor();
    AttnArgs aa;  // the per-layer view of the arguments, for the shared row helpers
    aa.B = a.B; aa.H = a.H; aa.Hk = a.Hk; aa.Tq = a.Tq; aa.Tk = a.Tk; aa.D = a.D; aa.Dv = a.D;
    aa.group = a.group; aa.off = a.off; aa.causal = a.causal; aa.scale = a.scale; aa.acc = a.acc;
    AT_DISPATCH_FLOATING_TYPES(a.acc, "attention_similarity_cpu", [&] {
      using T = scalar_t;
      at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: OpenMP workers start with it on
        std::vector<T> lse(static_cast<size_t>(L * R));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t blk = task % nblk, bh = task / nblk, b = bh / a.H, h = bh % a.H, hk = h / a.group;
          const int64_t r0 = blk * R, rows = std::min(R, a.Tq - r0), kend = keys_end(aa, r0, rows);
          if (kend == 0) continue;  // no valid row
          // probs[l] (rows x kend): every layer's probability rows of this block
          std::vector<at::Tensor> probs(static_cast<size_t>(L));
          for (int64_t l = 0; l < L; ++l) {
            probs[l] = at::mm(qa[l][b][h].narrow(0, r0, rows), ka[l][b][hk].narrow(0, 0, kend).t()).contiguous();
            probs_rows<T>(probs[l].data_ptr<T>(), rows, kend, r0, aa, mask_rows(m, b, h), nullptr, &lse[l * R]);
          }
          double* out = partial.data() + task * (npairs + 1);
          std::vector<double> row(static_cast<size_t>(npairs));
          for (int64_t r = 0; r < rows; ++r) {
            if (lse[r] == neg_inf<T>()) continue;  // a fully masked row (the same in every layer)
            for (int64_t x = 0, p = 0; x < L; ++x) {
              const T* px = probs[x].data_ptr<T>() + r * kend;
              for (int64_t y = 0; y <= x; ++y, ++p) {
                const T* py = probs[y].data_ptr<T>() + r * kend;
                T s = 0;
                if (a.cosine) {
                  for (int64_t j = 0; j < kend; ++j) s += px[j] * py[j];
                } else {  // sum_j of 0.5 [a log(2a / (a + b)) + b log(2b / (a + b))], 0 log 0 = 0
                  for (int64_t j = 0; j < kend; ++j) {
                    const T u = px[j], w = py[j], mix = u + w;
                    if (mix > T(0)) {
                      const T lm = std::log(mix * T(0.5));
                      s += (u > T(0) ? u * (std::log(u) - lm) : T(0)) + (w > T(0) ? w * (std::log(w) - lm) : T(0));
                    }
                  }
                  s *= T(0.5);
                }
                row[p] = static_cast<double>(s);
              }
            }
            for (int64_t x = 0, p = 0; x < L; ++x)
              for (int64_t y = 0; y <= x; ++y, ++p) {
                double sim;
                if (a.cosine) {
                  const double nx = row[x * (x + 1) / 2 + x], ny = row[y * (y + 1) / 2 + y];
                  sim = (nx > 0 && ny > 0) ? row[p] / std::sqrt(nx * ny) : 0.0;
                } else {
                  sim = std::clamp(1.0 - row[p] / std::log(2.0), 0.0, 1.0);
                }
                out[p] += sim;
              }
            out[npairs] += 1.0;
          }
        }
      });
    });
  }
  std::vector<double> total(static_cast<size_t>(npairs + 1), 0.0);
  for (int64_t t = 0; t < ntasks; ++t)
    for (int64_t p = 0; p <= npairs; ++p) total[p] += partial[t * (npairs + 1) + p];
  at::Tensor sim = at::empty({L, L}, qs.options().dtype(at::kDouble));
  double* s = sim.data_ptr<double>();
  for (int64_t x = 0, p = 0; x < L; ++x)
    for (int64_t y = 0; y <= x; ++y, ++p) s[x * L + y] = s[y * L + x] = total[p] / total[npairs];  // 0/0: NaN
  return sim.to(a.acc);
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("shared_attention_fwd", &shared_attention_fwd_cpu);
  m.impl("shared_attention_bwd", &shared_attention_bwd_cpu);
  m.impl("shared_attention_group_bwd", &shared_attention_group_bwd_cpu);
  m.impl("shared_attention_probs_fwd", &shared_attention_probs_fwd_cpu);
  m.impl("shared_attention_probs_bwd", &shared_attention_probs_bwd_cpu);
  m.impl("attention_similarity", &attention_similarity_cpu);
}

}  // namespace kdk
