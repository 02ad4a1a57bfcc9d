// Declarations of every op implementation: <stem>_{fwd,bwd}_{cpu,cuda}.
#pragma once
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace kdk {

using OptTensor = c10::optional<at::Tensor>;

#define KDK_TOPK_KL_FWD_ARGS                                                                      \
  const at::Tensor &logits, const at::Tensor &values, const OptTensor &indices,                    \
      const OptTensor &row_mask, c10::string_view mode, c10::string_view divergence, double param, \
      double temperature, bool values_are_logprobs, bool drop_out_of_range, bool validate, double logit_scale, \
      double softcap
#define KDK_TOPK_KL_BWD_ARGS                                                                        \
  const at::Tensor &grad_loss, const at::Tensor &logits, const at::Tensor &values,                   \
      const OptTensor &indices, const at::Tensor &lse, const at::Tensor &coef, const at::Tensor &stat, \
      c10::string_view mode, c10::string_view divergence, double param, double temperature,          \
      bool values_are_logprobs, double logit_scale, double softcap

// The backward written into the logits' own storage (docs/topk_kl.md, inplace_grad).
#define KDK_TOPK_KL_BWD_INPLACE_ARGS                                                                   \
  const at::Tensor &grad_loss, at::Tensor &logits, const at::Tensor &values, const OptTensor &indices, \
      const at::Tensor &lse, const at::Tensor &coef, const at::Tensor &stat, c10::string_view mode,    \
      c10::string_view divergence, double param, double temperature, bool values_are_logprobs,          \
      double logit_scale, double softcap

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cpu(KDK_TOPK_KL_FWD_ARGS);
at::Tensor topk_kl_bwd_cpu(KDK_TOPK_KL_BWD_ARGS);
void topk_kl_bwd_inplace_cpu(KDK_TOPK_KL_BWD_INPLACE_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cuda(KDK_TOPK_KL_FWD_ARGS);
at::Tensor topk_kl_bwd_cuda(KDK_TOPK_KL_BWD_ARGS);
void topk_kl_bwd_inplace_cuda(KDK_TOPK_KL_BWD_INPLACE_ARGS);

// Batched log-domain Sinkhorn and the SinKD cost (docs/sinkhorn.md).
#define KDK_SINKHORN_FWD_ARGS                                                                       \
  const at::Tensor &cost, const OptTensor &log_a, const OptTensor &log_b, double eps, int64_t n_iters, \
      double tol, bool return_plan, bool validate
#define KDK_SINKHORN_BWD_ARGS                                                                          \
  const at::Tensor &grad_value, const OptTensor &grad_plan, const at::Tensor &cost, const OptTensor &log_a, \
      const OptTensor &log_b, const at::Tensor &f, const at::Tensor &g, const at::Tensor &iters, double eps,  \
      c10::string_view grad, bool grad_marginals
#define KDK_SINKHORN_COST_FWD_ARGS \
  const at::Tensor &student_logits, const at::Tensor &teacher_logits, double temperature, c10::string_view cost, \
      bool validate
#define KDK_SINKHORN_COST_BWD_ARGS                                                                     \
  const at::Tensor &grad_cost, const at::Tensor &student_logits, const at::Tensor &teacher_logits, \
      double temperature, c10::string_view cost

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cpu(KDK_SINKHORN_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cpu(KDK_SINKHORN_BWD_ARGS);
at::Tensor sinkhorn_cost_fwd_cpu(KDK_SINKHORN_COST_FWD_ARGS);
at::Tensor sinkhorn_cost_bwd_cpu(KDK_SINKHORN_COST_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(KDK_SINKHORN_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(KDK_SINKHORN_BWD_ARGS);
at::Tensor sinkhorn_cost_fwd_cuda(KDK_SINKHORN_COST_FWD_ARGS);
at::Tensor sinkhorn_cost_bwd_cuda(KDK_SINKHORN_COST_BWD_ARGS);

// Token-relation graph losses (relation KL / MSE) and the token contrastive loss (docs/token_relation.md).
#define KDK_TOKEN_RELATION_FWD_ARGS                                                                  \
  const at::Tensor &student, const at::Tensor &teacher, const OptTensor &mask, c10::string_view loss, \
      c10::string_view similarity, int64_t num_heads, double temperature, double tau
#define KDK_TOKEN_RELATION_BWD_ARGS                                                                      \
  const at::Tensor &grad_loss, const at::Tensor &student, const at::Tensor &teacher, const OptTensor &mask, \
      const at::Tensor &stat, c10::string_view loss, c10::string_view similarity, int64_t num_heads,         \
      double temperature, double tau, bool teacher_grad
#define KDK_TOKEN_CONTRASTIVE_FWD_ARGS                                                       \
  const at::Tensor &student, const at::Tensor &teacher, const OptTensor &mask, c10::string_view similarity, \
      double tau
#define KDK_TOKEN_CONTRASTIVE_BWD_ARGS                                                                   \
  const at::Tensor &grad_loss, const at::Tensor &student, const at::Tensor &teacher, const OptTensor &mask, \
      const at::Tensor &lse, c10::string_view similarity, double tau, bool teacher_grad

std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cpu(KDK_TOKEN_RELATION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cpu(KDK_TOKEN_RELATION_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd_cpu(KDK_TOKEN_CONTRASTIVE_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd_cpu(KDK_TOKEN_CONTRASTIVE_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cuda(KDK_TOKEN_RELATION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cuda(KDK_TOKEN_RELATION_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_contrastive_fwd_cuda(KDK_TOKEN_CONTRASTIVE_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> token_contrastive_bwd_cuda(KDK_TOKEN_CONTRASTIVE_BWD_ARGS);

// Attention with its log-sum-exp, shared (EchoAtt) attention and the layer-similarity analysis
// (docs/shared_attention.md).
#define KDK_ATTENTION_FWD_ARGS \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const OptTensor &mask, bool causal, double scale
#define KDK_ATTENTION_BWD_ARGS                                                                              \
  const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out, \
      const at::Tensor &lse, const OptTensor &mask, bool causal, double scale
#define KDK_SHARED_ATTENTION_FWD_ARGS                                                                     \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &lse, const at::Tensor &v, const OptTensor &mask, \
      bool causal, double scale
#define KDK_SHARED_ATTENTION_BWD_ARGS                                                                         \
  const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &lse, const at::Tensor &v, \
      const at::Tensor &out, const OptTensor &mask, bool causal, double scale, bool grad_qk
#define KDK_SHARED_ATTENTION_GROUP_BWD_ARGS                                                                   \
  const at::Tensor &grad_out, const at::Tensor &q, const at::Tensor &k, const at::Tensor &lse, const at::Tensor &v, \
      const at::Tensor &out, const OptTensor &mask, bool causal, double scale
#define KDK_SHARED_ATTENTION_PROBS_FWD_ARGS \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &lse, const OptTensor &mask, bool causal, double scale
#define KDK_SHARED_ATTENTION_PROBS_BWD_ARGS \
  const at::Tensor &grad_probs, const at::Tensor &probs, const at::Tensor &q, const at::Tensor &k, double scale
#define KDK_ATTENTION_SIMILARITY_ARGS                                                                   \
  const at::Tensor &qs, const at::Tensor &ks, const OptTensor &mask, bool causal, double scale, \
      c10::string_view metric

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(KDK_ATTENTION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(KDK_ATTENTION_BWD_ARGS);
at::Tensor shared_attention_fwd_cpu(KDK_SHARED_ATTENTION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_attention_bwd_cpu(KDK_SHARED_ATTENTION_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor> shared_attention_group_bwd_cpu(KDK_SHARED_ATTENTION_GROUP_BWD_ARGS);
at::Tensor shared_attention_probs_fwd_cpu(KDK_SHARED_ATTENTION_PROBS_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> shared_attention_probs_bwd_cpu(KDK_SHARED_ATTENTION_PROBS_BWD_ARGS);
at::Tensor attention_similarity_cpu(KDK_ATTENTION_SIMILARITY_ARGS);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(KDK_ATTENTION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(KDK_ATTENTION_BWD_ARGS);
at::Tensor shared_attention_fwd_cuda(KDK_SHARED_ATTENTION_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_attention_bwd_cuda(KDK_SHARED_ATTENTION_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor> shared_attention_group_bwd_cuda(KDK_SHARED_ATTENTION_GROUP_BWD_ARGS);
at::Tensor shared_attention_probs_fwd_cuda(KDK_SHARED_ATTENTION_PROBS_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> shared_attention_probs_bwd_cuda(KDK_SHARED_ATTENTION_PROBS_BWD_ARGS);
at::Tensor attention_similarity_cuda(KDK_ATTENTION_SIMILARITY_ARGS);

}  // namespace kdk
