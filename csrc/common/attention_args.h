// Argument parsing of the attention ops (attention_*, shared_attention_*, shared_attention_probs_*,
// attention_similarity), shared by the CPU and CUDA backends; every refusal's text lives in attention_args.cpp.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace kdk {

// The largest head size (of Q/K and of V) the CUDA kernels take; the CPU ops take any size.
constexpr int64_t kAttnCudaMaxHeadDim = 128;

// Names of the arguments as the public function calls them (messages say "kdkernels.<op>: <name> ...").
struct AttnNames {
  const char* op;   // "attention" or "shared_attention"
  const char* q;    // "q" / "q_anchor"
  const char* k;    // "k" / "k_anchor"
  const char* v;    // "v"
  const char* lse;  // "lse" / "lse_anchor"
};
extern const AttnNames kAttentionNames, kSharedNames;

struct AttnArgs {
  int64_t B, H, Hk, Tq, Tk, D, Dv;
  int64_t group;  // H / Hk: query heads per key/value head
  int64_t off;    // Tk - Tq: causal alignment (query i sees keys j <= i + off; bottom-right, as flash-attn)
  bool causal;
  double scale;
  at::ScalarType acc;  // float32, or float64 for float64 inputs
};

// q (B, H, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) or null, lse (B, H, Tq) in the accumulation dtype or
// null, mask (B, H, Tq, Tk) bool (any strides, e.g. an expanded broadcast) or None.
AttnArgs attention_parse(const AttnNames& n, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                         const at::Tensor* lse, const c10::optional<at::Tensor>& mask, bool causal, double scale);

// The backward ops' extra inputs: grad_out and out (B, H, Tq, Dv) in the dtype of q.
void attention_check_grad(const AttnNames& n, const AttnArgs& a, const at::Tensor& grad_out, const at::Tensor& out,
                          const at::Tensor& q);

// shared_attention_group_bwd: v (L, B, Hk, Tk, Dv), grad_out and out (L, B, H, Tq, Dv), L >= 1, in the dtype of
// q; the args of the anchor with one layer's v.
AttnArgs shared_group_parse(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& lse, const at::Tensor& v, const at::Tensor& out,
                            const c10::optional<at::Tensor>& mask, bool causal, double scale);

// shared_attention_probs_bwd: grad_probs and probs (B, H, Tq, Tk) in the dtype of q.
void attention_check_probs(const AttnArgs& a, const at::Tensor& grad_probs, const at::Tensor& probs,
                           const at::Tensor& q);

struct SimArgs {
  int64_t L, B, H, Hk, Tq, Tk, D, group, off;
  bool causal, cosine;
  double scale;
  at::ScalarType acc;
};

// attention_similarity: q (L, B, H, Tq, D), k (L, B, Hk, Tk, D), mask (B, H, Tq, Tk) bool or None.
SimArgs attention_similarity_parse(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& mask,
                                   bool causal, double scale, const std::string& metric);

// A tensor whose last dimension has unit stride (the others may be anything): itself, or a contiguous copy.
at::Tensor attn_unit_last(const at::Tensor& t);

}  // namespace kdk
