// Argument parsing and the feature preparation of the token-relation ops (token_relation_*, token_contrastive_*),
// shared by the CPU and CUDA backends; every refusal's text lives in token_relation_args.cpp.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace kdk {

// x / max(|x|, kCosineEps) per head under similarity='cosine' (as torch.nn.functional.normalize).
constexpr double kCosineEps = 1e-8;

struct RelationArgs {
  int loss;      // kRelKL / kRelMSE
  bool cosine;
  int64_t P, n;  // problems (instances, or 1 for an inter graph) and tokens per problem
  int64_t H, Ds, Dt, ds, dt;  // heads, widths, widths per head
  double beta_s, beta_t;      // the similarity scale over the temperature, student and teacher
};

// token_relation_fwd/_bwd: student (P, n, Ds), teacher (P, n, Dt), mask (P, n) bool or None.
RelationArgs token_relation_parse(const at::Tensor& student, const at::Tensor& teacher,
                                  const c10::optional<at::Tensor>& mask, const std::string& loss,
                                  const std::string& similarity, int64_t num_heads, double temperature, double tau);

struct ContrastiveArgs {
  bool cosine;
  int64_t P, n, D;
  double beta;  // 1 / tau
};

// token_contrastive_fwd/_bwd: student (P, n, D), teacher (P, n, D), mask (P, n) bool or None.
ContrastiveArgs token_contrastive_parse(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& mask, const std::string& similarity,
                                        double tau);

// The shape checks of the backward ops' extra inputs (grad_loss (P, n), the saved statistics).
void token_relation_check_saved(const RelationArgs& a, const at::Tensor& grad_loss, const at::Tensor& stat,
                                const at::Tensor& student);
void token_contrastive_check_saved(const ContrastiveArgs& a, const at::Tensor& grad_loss, const at::Tensor& lse,
                                   const at::Tensor& student);

// Masked tokens are neither queries nor keys, so each problem is an unmasked one on its valid tokens:
// the ops move the valid tokens to the front (stable) and run on per-problem lengths.
// perm (P, n) int64: position -> original token; lens (P,) int32. Both undefined without a mask.
struct TokenOrder {
  at::Tensor perm, lens;
};
TokenOrder token_order(const c10::optional<at::Tensor>& mask);

// (P, n, D) -> (P, H, n, D / H) contiguous in `dtype`, tokens in `o`'s order, every head's vector
// divided by max(|x|, kCosineEps) when cosine (computed in float32, float64 for float64 input).
// May be a view of x (no mask, one head, dot, same dtype, contiguous): read-only.
at::Tensor token_heads(const at::Tensor& x, const TokenOrder& o, int64_t H, bool cosine, at::ScalarType dtype);

// The gradient g (P, H, n, D / H) of token_heads' output -> the gradient of x (P, n, D), in x's dtype
// (masked tokens get 0).
at::Tensor token_heads_backward(const at::Tensor& g, const at::Tensor& x, const TokenOrder& o, int64_t H,
                                bool cosine);

// Per-row values (P, n) in the compact order -> the original token order (0 for masked tokens), and back.
at::Tensor token_unorder_rows(const at::Tensor& v, const TokenOrder& o);
at::Tensor token_order_rows(const at::Tensor& v, const TokenOrder& o);

}  // namespace kdk
