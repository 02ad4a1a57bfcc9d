// Argument parsing and validation of the top-k KL ops, shared by the CPU and CUDA backends.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace kdk {

struct TopkArgs {
  int mode, div;
  double param, temperature;
  bool logprobs, drop;
  int64_t N, V, K;
  double logit_scale = 1, softcap = 0;  // the student's final-logit map (LogitMap in topk_kl_math.h)
};

// Checks and records the student's final-logit map: logit_scale > 0, softcap >= 0 (0 = none).
void topk_kl_logit_map(TopkArgs& a, double logit_scale, double softcap);

// Checks shapes, dtypes, devices and options; messages as in docs/topk_kl.md.
TopkArgs topk_kl_parse(const at::Tensor& logits, const at::Tensor& values,
                       const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& row_mask,
                       const std::string& mode, const std::string& divergence, double param,
                       double temperature, bool values_are_logprobs, bool drop_out_of_range);

// The backward's saved inputs: grad_loss (N,), lse (N,), coef (N, K), stat (N, kTopkStat), in the accumulation
// dtype (float64 for float64 logits, else float32), on the logits' device. A raw call with anything else
// would read out of bounds.
void topk_kl_check_saved(const TopkArgs& a, const at::Tensor& logits, const at::Tensor& grad_loss,
                         const at::Tensor& lse, const at::Tensor& coef, const at::Tensor& stat);

// The in-place backward's logits: contiguous (N, V) (its gradient is written row after row over them).
void topk_kl_check_inplace(const at::Tensor& logits);

// Data checks of the ids (range unless dropped, duplicates within a row); one host sync on CUDA.
void topk_kl_validate_ids(const at::Tensor& indices, int64_t V, bool drop);

}  // namespace kdk
