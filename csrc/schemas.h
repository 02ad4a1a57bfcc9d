// Every op schema of kdkernels, defined once: the real library (kdkernels) and the emulated CUDA library
// (kdkernels_emu, csrc/emu/module.cpp) declare the same ops.
#pragma once
#include <torch/library.h>

namespace kdk {

inline void define_ops(torch::Library& m) {
  // Fused top-k KL (docs/topk_kl.md): per-row losses and the statistics the backward needs.
  m.def("topk_kl_fwd(Tensor logits, Tensor values, Tensor? indices, Tensor? row_mask, str mode, str divergence, "
        "float param, float temperature, bool values_are_logprobs, bool drop_out_of_range, bool validate, "
        "float logit_scale=1., float softcap=0.) -> (Tensor loss, Tensor lse, Tensor coef, Tensor stat)");
  m.def("topk_kl_bwd(Tensor grad_loss, Tensor logits, Tensor values, Tensor? indices, Tensor lse, Tensor coef, "
        "Tensor stat, str mode, str divergence, float param, float temperature, bool values_are_logprobs, "
        "float logit_scale=1., float softcap=0.) -> Tensor");
  // A mutating op's argument named `mode` collides with torch's mode-dispatch helpers (opcheck, compile).
  m.def("topk_kl_bwd_inplace(Tensor grad_loss, Tensor(a!) logits, Tensor values, Tensor? indices, Tensor lse, "
        "Tensor coef, Tensor stat, str topk_mode, str divergence, float param, float temperature, "
        "bool values_are_logprobs, float logit_scale=1., float softcap=0.) -> ()");
  // Batched log-domain Sinkhorn (docs/sinkhorn.md): values, the potentials of every iteration, the
  // iteration counts and (when asked) the plans; the backward of the unrolled loop or the envelope.
  m.def("sinkhorn_fwd(Tensor cost, Tensor? log_a, Tensor? log_b, float eps, int n_iters, float tol, "
        "bool return_plan, bool validate) -> (Tensor value, Tensor f, Tensor g, Tensor iters, Tensor plan)");
  m.def("sinkhorn_bwd(Tensor grad_value, Tensor? grad_plan, Tensor cost, Tensor? log_a, Tensor? log_b, Tensor f, "
        "Tensor g, Tensor iters, float eps, str grad, bool grad_marginals) "
        "-> (Tensor grad_cost, Tensor grad_log_a, Tensor grad_log_b)");
  // The SinKD cost: softmax at temperature, then L1 / squared-L2 distances of every student-teacher pair.
  m.def("sinkhorn_cost_fwd(Tensor student_logits, Tensor teacher_logits, float temperature, str cost, "
        "bool validate) -> Tensor");
  m.def("sinkhorn_cost_bwd(Tensor grad_cost, Tensor student_logits, Tensor teacher_logits, float temperature, "
        "str cost) -> Tensor");
  // Token-relation graph losses and the token contrastive loss (docs/token_relation.md): per-row losses
  // (original token order) and the row statistics (valid tokens first) the recomputing backward needs.
  m.def("token_relation_fwd(Tensor student, Tensor teacher, Tensor? mask, str loss, str similarity, int num_heads, "
        "float temperature, float tau) -> (Tensor loss, Tensor stat)");
  m.def("token_relation_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, Tensor stat, str loss, "
        "str similarity, int num_heads, float temperature, float tau, bool teacher_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)");
  m.def("token_contrastive_fwd(Tensor student, Tensor teacher, Tensor? mask, str similarity, float tau) "
        "-> (Tensor loss, Tensor lse)");
  m.def("token_contrastive_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, Tensor lse, "
        "str similarity, float tau, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
  // Attention with its log-sum-exp (float32 statistics, GQA), shared (EchoAtt) attention re-using an anchor's
  // softmax for a new V (recompute from the saved LSE, or materialised probabilities), and the streamed
  // layer-similarity matrix (docs/shared_attention.md).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) "
        "-> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("shared_attention_fwd(Tensor q_anchor, Tensor k_anchor, Tensor lse_anchor, Tensor v, Tensor? mask, "
        "bool causal, float scale) -> Tensor");
  m.def("shared_attention_bwd(Tensor grad_out, Tensor q_anchor, Tensor k_anchor, Tensor lse_anchor, Tensor v, "
        "Tensor out, Tensor? mask, bool causal, float scale, bool grad_qk) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The recompute-mode group backward of EchoAtt: dQ, dK of the anchor for all its sharing layers at once
  // (grad_out, v, out stacked (L, ...) over the layers; dP sums over them, dS is formed once).
  m.def("shared_attention_group_bwd(Tensor grad_out, Tensor q_anchor, Tensor k_anchor, Tensor lse_anchor, "
        "Tensor v, Tensor out, Tensor? mask, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k)");
  m.def("shared_attention_probs_fwd(Tensor q_anchor, Tensor k_anchor, Tensor lse_anchor, Tensor? mask, "
        "bool causal, float scale) -> Tensor");
  m.def("shared_attention_probs_bwd(Tensor grad_probs, Tensor probs, Tensor q_anchor, Tensor k_anchor, "
        "float scale) -> (Tensor grad_q, Tensor grad_k)");
  m.def("attention_similarity(Tensor qs, Tensor ks, Tensor? mask, bool causal, float scale, str metric) -> Tensor");
}

}  // namespace kdk
