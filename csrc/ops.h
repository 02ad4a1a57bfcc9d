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
      double temperature, bool values_are_logprobs, bool drop_out_of_range, bool validate
#define KDK_TOPK_KL_BWD_ARGS                                                                        \
  const at::Tensor &grad_loss, const at::Tensor &logits, const at::Tensor &values,                   \
      const OptTensor &indices, const at::Tensor &lse, const at::Tensor &coef, const at::Tensor &stat, \
      c10::string_view mode, c10::string_view divergence, double param, double temperature,          \
      bool values_are_logprobs

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cpu(KDK_TOPK_KL_FWD_ARGS);
at::Tensor topk_kl_bwd_cpu(KDK_TOPK_KL_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_fwd_cuda(KDK_TOPK_KL_FWD_ARGS);
at::Tensor topk_kl_bwd_cuda(KDK_TOPK_KL_BWD_ARGS);

}  // namespace kdk
