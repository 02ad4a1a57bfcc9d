// Argument parsing of the attention ops (one place for every refusal's text; kdkernels/_meta.py mirrors it).
#include "common/attention_args.h"

#include <cmath>

#include <ATen/ATen.h>

#include "common/checks.h"

namespace kdk {

const AttnNames kAttentionNames{"attention", "q", "k", "v", "lse"};
const AttnNames kSharedNames{"shared_attention", "q_anchor", "k_anchor", "v", "lse_anchor"};

static void check_float(const char* op, const at::Tensor& t, const char* name) {
  KDK_CHECK(op, is_kernel_float(t.scalar_type()), name, " must be float32, float16, bfloat16 or float64: got ",
            dtype_str(t.scalar_type()));
}

static void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  KDK_CHECK(op, t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, ": expected ",
            dtype_str(ref.scalar_type()), ", got ", dtype_str(t.scalar_type()));
  KDK_CHECK(op, t.device() == ref.device(), name, " must be on the device of ", ref_name, ": expected ",
            ref.device().str(), ", got ", t.device().str());
}

static void check_head_dim(const char* op, const at::Tensor& q, const char* what, int64_t d) {
  KDK_CHECK(op, d >= 1, what, " must be >= 1: got ", d);
  KDK_CHECK(op, !q.is_cuda() || d <= kAttnCudaMaxHeadDim, "the CUDA kernels take ", what, " <= ",
            kAttnCudaMaxHeadDim, ": got ", d, " (the CPU ops take any size)");
}

static void check_mask(const char* op, const c10::optional<at::Tensor>& mask, const at::Tensor& q,
                       const char* q_name, std::initializer_list<int64_t> shape) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  KDK_CHECK(op, m.device() == q.device(), "mask must be on the device of ", q_name, ": expected ", q.device().str(),
            ", got ", m.device().str());
  KDK_CHECK(op, m.scalar_type() == at::kBool && m.sizes().equals(shape),
            "mask must be a bool tensor of shape (B, H, Tq, Tk) = ", shape_str(shape),
            " for the raw op (expand a broadcastable mask first): got ", shape_str(m.sizes()), " ",
            dtype_str(m.scalar_type()));
}

AttnArgs attention_parse(const AttnNames& n, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                         const at::Tensor* lse, const c10::optional<at::Tensor>& mask, bool causal, double scale) {
  const char* op = n.op;
  check_float(op, q, n.q);
  KDK_CHECK(op, q.dim() == 4, n.q, " must be 4-D (batch, heads, seq, head_dim): got shape ", shape_str(q.sizes()));
  check_like(op, k, n.k, q, n.q);
  KDK_CHECK(op, k.dim() == 4, n.k, " must be 4-D (batch, heads, seq, head_dim): got shape ", shape_str(k.sizes()));
  AttnArgs a;
  a.B = q.size(0); a.H = q.size(1); a.Tq = q.size(2); a.D = q.size(3);
  a.Hk = k.size(1); a.Tk = k.size(2);
  KDK_CHECK(op, k.size(0) == a.B, n.k, " must have the batch size of ", n.q, ": expected ", a.B, ", got ", k.size(0));
  KDK_CHECK(op, k.size(3) == a.D, n.k, " must have the head_dim of ", n.q, ": expected ", a.D, ", got ", k.size(3));
  KDK_CHECK(op, a.Hk >= 1 && a.H % a.Hk == 0, "the heads of ", n.q, " must be a multiple of the heads of ", n.k,
            " (grouped-query attention): got ", a.H, " and ", a.Hk);
  a.Dv = a.D;
  if (v) {
    check_like(op, *v, n.v, q, n.q);
    KDK_CHECK(op, v->dim() == 4, n.v, " must be 4-D (batch, heads, seq, head_dim): got shape ",
              shape_str(v->sizes()));
    KDK_CHECK(op, v->size(0) == a.B && v->size(1) == a.Hk && v->size(2) == a.Tk, n.v,
              " must have the (batch, heads, seq) of ", n.k, ": expected ", shape_str({a.B, a.Hk, a.Tk}), ", got ",
              shape_str(v->sizes().slice(0, 3)));
    a.Dv = v->size(3);
  }
  check_head_dim(op, q, "head_dim", a.D);
  if (v) check_head_dim(op, q, "the head_dim of v", a.Dv);
  a.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (lse) {
    KDK_CHECK(op, lse->device() == q.device(), n.lse, " must be on the device of ", n.q, ": expected ",
              q.device().str(), ", got ", lse->device().str());
    KDK_CHECK(op, lse->scalar_type() == a.acc, n.lse, " must be ", dtype_str(a.acc),
              " (the log-sum-exp kdkernels.attention returns for ", dtype_str(q.scalar_type()), " inputs): got ",
              dtype_str(lse->scalar_type()));
    KDK_CHECK(op, lse->sizes().equals({a.B, a.H, a.Tq}), n.lse, " must have shape (B, H, Tq) = ",
              shape_str({a.B, a.H, a.Tq}), ": got ", shape_str(lse->sizes()));
  }
  check_mask(op, mask, q, n.q, {a.B, a.H, a.Tq, a.Tk});
  KDK_CHECK(op, std::isfinite(scale), "scale must be finite: got ", scale);
  a.group = a.H / a.Hk;
  a.off = a.Tk - a.Tq;
  a.causal = causal;
  a.scale = scale;
  return a;
}

void attention_check_grad(const AttnNames& n, const AttnArgs& a, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& q) {
  check_like(n.op, grad_out, "grad_out", q, n.q);
  check_like(n.op, out, "out", q, n.q);
  KDK_CHECK(n.op, grad_out.sizes().equals({a.B, a.H, a.Tq, a.Dv}), "grad_out must have shape (B, H, Tq, Dv) = ",
            shape_str({a.B, a.H, a.Tq, a.Dv}), ": got ", shape_str(grad_out.sizes()));
  KDK_CHECK(n.op, out.sizes().equals({a.B, a.H, a.Tq, a.Dv}), "out must have shape (B, H, Tq, Dv) = ",
            shape_str({a.B, a.H, a.Tq, a.Dv}), ": got ", shape_str(out.sizes()));
}

AttnArgs shared_group_parse(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& lse, const at::Tensor& v, const at::Tensor& out,
                            const c10::optional<at::Tensor>& mask, bool causal, double scale) {
  const char* op = "shared_attention_group_bwd";
  KDK_CHECK(op, v.dim() == 5 && v.size(0) >= 1, "v must be the sharing layers' values stacked (L, B, Hk, Tk, Dv) "
            "with L >= 1: got shape ", shape_str(v.sizes()));
  const at::Tensor v0 = v[0];
  const AttnArgs a = attention_parse(kSharedNames, q, k, &v0, &lse, mask, causal, scale);
  const int64_t L = v.size(0);
  for (const at::Tensor* t : {&grad_out, &out}) {
    const char* name = t == &out ? "out" : "grad_out";
    check_like(op, *t, name, q, kSharedNames.q);
    KDK_CHECK(op, t->sizes().equals({L, a.B, a.H, a.Tq, a.Dv}), name, " must have shape (L, B, H, Tq, Dv) = ",
              shape_str({L, a.B, a.H, a.Tq, a.Dv}), ": got ", shape_str(t->sizes()));
  }
  return a;
}

void attention_check_probs(const AttnArgs& a, const at::Tensor& grad_probs, const at::Tensor& probs,
                           const at::Tensor& q) {
  const char* op = kSharedNames.op;
  check_like(op, grad_probs, "grad_probs", q, kSharedNames.q);
  check_like(op, probs, "probs", q, kSharedNames.q);
  for (const at::Tensor* t : {&grad_probs, &probs})
    KDK_CHECK(op, t->sizes().equals({a.B, a.H, a.Tq, a.Tk}), (t == &probs ? "probs" : "grad_probs"),
              " must have shape (B, H, Tq, Tk) = ", shape_str({a.B, a.H, a.Tq, a.Tk}), ": got ",
              shape_str(t->sizes()));
}

SimArgs attention_similarity_parse(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& mask,
                                   bool causal, double scale, const std::string& metric) {
  const char* op = "attention_similarity";
  KDK_CHECK(op, metric == "js" || metric == "cosine", "metric must be 'js' or 'cosine': got '", metric, "'");
  check_float(op, q, "qs");
  KDK_CHECK(op, q.dim() == 5, "qs must be 5-D (layers, batch, heads, seq, head_dim) for the raw op: got shape ",
            shape_str(q.sizes()));
  check_like(op, k, "ks", q, "qs");
  KDK_CHECK(op, k.dim() == 5, "ks must be 5-D (layers, batch, heads, seq, head_dim) for the raw op: got shape ",
            shape_str(k.sizes()));
  SimArgs a;
  a.L = q.size(0); a.B = q.size(1); a.H = q.size(2); a.Tq = q.size(3); a.D = q.size(4);
  a.Hk = k.size(2); a.Tk = k.size(3);
  KDK_CHECK(op, a.L >= 1, "qs must hold at least one layer: got shape ", shape_str(q.sizes()));
  KDK_CHECK(op, k.size(0) == a.L && k.size(1) == a.B && k.size(4) == a.D,
            "ks must have the (layers, batch, ..., head_dim) of qs: expected ", shape_str({a.L, a.B, a.D}), ", got ",
            shape_str({k.size(0), k.size(1), k.size(4)}));
  KDK_CHECK(op, a.Hk >= 1 && a.H % a.Hk == 0,
            "the heads of qs must be a multiple of the heads of ks (grouped-query attention): got ", a.H, " and ", a.Hk);
  check_head_dim(op, q, "head_dim", a.D);
  check_mask(op, mask, q, "qs", {a.B, a.H, a.Tq, a.Tk});
  KDK_CHECK(op, std::isfinite(scale), "scale must be finite: got ", scale);
  a.group = a.H / a.Hk;
  a.off = a.Tk - a.Tq;
  a.causal = causal;
  a.cosine = metric == "cosine";
  a.scale = scale;
  a.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

at::Tensor attn_unit_last(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace kdk
