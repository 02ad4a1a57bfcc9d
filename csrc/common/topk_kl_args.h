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
};

// Checks shapes, dtypes, devices and options; messages as in docs/topk_kl.md.
TopkArgs topk_kl_parse(const at::Tensor& logits, const at::Tensor& values,
                       const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& row_mask,
                       const std::string& mode, const std::string& divergence, double param,
                       double temperature, bool values_are_logprobs, bool drop_out_of_range);

// Data checks of the ids (range unless dropped, duplicates within a row); one host sync on CUDA.
void topk_kl_validate_ids(const at::Tensor& indices, int64_t V, bool drop);

}  // namespace kdk
