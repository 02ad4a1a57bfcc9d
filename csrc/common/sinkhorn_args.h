// Argument parsing and validation of the Sinkhorn ops, shared by the CPU and CUDA backends.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>

namespace kdk {

struct SinkhornArgs {
  int64_t B, n, m, L;
  double eps, tol;
  int grad;  // kGradUnrolled / kGradEnvelope (backward only)
};

// sinkhorn_fwd: cost (B, n, m), log_a (B, n) / log_b (B, m) in the accumulation dtype or None (= 0).
SinkhornArgs sinkhorn_parse(const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                            const c10::optional<at::Tensor>& log_b, double eps, int64_t n_iters, double tol);

// sinkhorn_bwd: the forward's checks plus the shapes of the saved potentials.
SinkhornArgs sinkhorn_parse_bwd(const at::Tensor& grad_value, const c10::optional<at::Tensor>& grad_plan,
                                const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                                const c10::optional<at::Tensor>& log_b, const at::Tensor& f, const at::Tensor& g,
                                const at::Tensor& iters, double eps, const std::string& grad);

// Data checks with ATen ops (one host sync on CUDA): cost free of NaN and -inf, every present row and
// column with a finite entry among the present points, log-marginals free of NaN and +inf.
// The CPU backend detects the same conditions inside its solve and reports them with the same texts.
void sinkhorn_validate(const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                       const c10::optional<at::Tensor>& log_b);

// The refusal texts of the data checks, so both detections print the same message.
std::string sinkhorn_msg_cost_nan(int64_t b);
std::string sinkhorn_msg_row(int64_t b, int64_t i);
std::string sinkhorn_msg_col(int64_t b, int64_t j);
std::string sinkhorn_msg_marginal(const char* name, int64_t b);

struct SinkhornCostArgs {
  int64_t B, n, m, C;
  int kind;  // kCostL1 / kCostSqEuclidean
  double temperature;
};

// sinkhorn_cost_fwd/_bwd: student (B, n, C), teacher (B, m, C).
SinkhornCostArgs sinkhorn_cost_parse(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                     const std::string& cost);

// Finite logits (one host sync on CUDA); the CPU backend checks inside its softmax, same texts.
void sinkhorn_cost_validate(const at::Tensor& student, const at::Tensor& teacher);
std::string sinkhorn_msg_logits(const char* name, int64_t b, int64_t i);

}  // namespace kdk
