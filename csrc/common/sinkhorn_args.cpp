// Argument parsing and data validation of the Sinkhorn ops (one place for every refusal's text).
#include "common/sinkhorn_args.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/sinkhorn_math.h"

namespace kdk {

static constexpr const char* kOp = "sinkhorn";
static constexpr const char* kLossOp = "sinkhorn_kd_loss";

static c10::ScalarType acc_of(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

static void check_marginal(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& cost,
                           int64_t B, int64_t len) {
  if (!t.has_value()) return;
  KDK_CHECK(kOp, t->device() == cost.device(), name, " must be on the device of cost: expected ",
            cost.device().str(), ", got ", t->device().str());
  const auto acc = acc_of(cost.scalar_type());
  KDK_CHECK(kOp, t->scalar_type() == acc, name, " must be ", dtype_str(acc), " (the accumulation dtype of cost): got ",
            dtype_str(t->scalar_type()));
  KDK_CHECK(kOp, t->dim() == 2 && t->size(0) == B && t->size(1) == len, name, " must have shape ",
            shape_str({B, len}), ": got ", shape_str(t->sizes()));
}

SinkhornArgs sinkhorn_parse(const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                            const c10::optional<at::Tensor>& log_b, double eps, int64_t n_iters, double tol) {
  SinkhornArgs a{};
  KDK_CHECK(kOp, is_kernel_float(cost.scalar_type()), "cost must be float32, float16, bfloat16 or float64: got ",
            dtype_str(cost.scalar_type()));
  KDK_CHECK(kOp, cost.dim() == 3, "cost must be 3-D (B, n, m) for the raw op: got shape ", shape_str(cost.sizes()));
  KDK_CHECK(kOp, cost.size(0) >= 1 && cost.size(1) >= 1 && cost.size(2) >= 1,
            "cost must hold at least one problem with n, m >= 1: got shape ", shape_str(cost.sizes()));
  KDK_CHECK(kOp, eps > 0, "eps must be > 0: got ", eps);
  KDK_CHECK(kOp, n_iters >= 1, "n_iters must be >= 1: got ", n_iters);
  KDK_CHECK(kOp, tol >= 0, "tol must be >= 0: got ", tol);
  a.B = cost.size(0);
  a.n = cost.size(1);
  a.m = cost.size(2);
  a.L = n_iters;
  a.eps = eps;
  a.tol = tol;
  a.grad = kGradUnrolled;
  check_marginal(log_a, "log_a", cost, a.B, a.n);
  check_marginal(log_b, "log_b", cost, a.B, a.m);
  return a;
}

SinkhornArgs sinkhorn_parse_bwd(const at::Tensor& grad_value, const c10::optional<at::Tensor>& grad_plan,
                                const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                                const c10::optional<at::Tensor>& log_b, const at::Tensor& f, const at::Tensor& g,
                                const at::Tensor& iters, double eps, const std::string& grad) {
  KDK_CHECK(kOp, grad == "unrolled" || grad == "envelope", "grad must be 'unrolled' or 'envelope': got '", grad, "'");
  KDK_CHECK(kOp, f.dim() == 3 && f.size(0) == cost.size(0) && f.size(2) == cost.size(1),
            "f must have shape (B, L, n) = (", cost.size(0), ", L, ", cost.size(1), "): got ", shape_str(f.sizes()));
  SinkhornArgs a = sinkhorn_parse(cost, log_a, log_b, eps, f.size(1), 0.0);
  a.grad = grad == "unrolled" ? kGradUnrolled : kGradEnvelope;
  const auto acc = acc_of(cost.scalar_type());
  KDK_CHECK(kOp, f.scalar_type() == acc && g.scalar_type() == acc, "f and g must be ", dtype_str(acc), ": got ",
            dtype_str(f.scalar_type()), " and ", dtype_str(g.scalar_type()));
  KDK_CHECK(kOp, g.sizes() == at::IntArrayRef({a.B, a.L, a.m}), "g must have shape ", shape_str({a.B, a.L, a.m}),
            ": got ", shape_str(g.sizes()));
  KDK_CHECK(kOp, iters.scalar_type() == at::kInt && iters.sizes() == at::IntArrayRef({a.B}),
            "iters must be int32 of shape ", shape_str({a.B}), ": got ", dtype_str(iters.scalar_type()), " ",
            shape_str(iters.sizes()));
  KDK_CHECK(kOp, grad_value.sizes() == at::IntArrayRef({a.B}), "grad_value must have shape ", shape_str({a.B}),
            ": got ", shape_str(grad_value.sizes()));
  if (grad_plan.has_value())
    KDK_CHECK(kOp, grad_plan->sizes() == cost.sizes(), "grad_plan must have the shape of cost: expected ",
              shape_str(cost.sizes()), ", got ", shape_str(grad_plan->sizes()));
  for (const at::Tensor* t : {&grad_value, &f, &g, &iters})
    KDK_CHECK(kOp, t->device() == cost.device(), "every tensor must be on the device of cost: expected ",
              cost.device().str(), ", got ", t->device().str());
  return a;
}

std::string sinkhorn_msg_cost_nan(int64_t b) {
  return "cost must not contain NaN or -inf: found one in problem " + std::to_string(b);
}
std::string sinkhorn_msg_row(int64_t b, int64_t i) {
  return "cost row " + std::to_string(i) + " of problem " + std::to_string(b) +
         " has no finite entry (every pair of that point is forbidden)";
}
std::string sinkhorn_msg_col(int64_t b, int64_t j) {
  return "cost column " + std::to_string(j) + " of problem " + std::to_string(b) +
         " has no finite entry (every pair of that point is forbidden)";
}
std::string sinkhorn_msg_marginal(const char* name, int64_t b) {
  return std::string(name) + " must not contain NaN or +inf: found one in problem " + std::to_string(b);
}

// First problem index (and position) where `bad` (B, k) is true; -1 when none.
static std::pair<int64_t, int64_t> first_bad(const at::Tensor& bad) {
  if (!bad.any().item<bool>()) return {-1, -1};
  const at::Tensor where = bad.nonzero()[0].cpu();
  return {where[0].item<int64_t>(), where.size(0) > 1 ? where[1].item<int64_t>() : -1};
}

void sinkhorn_validate(const at::Tensor& cost, const c10::optional<at::Tensor>& log_a,
                       const c10::optional<at::Tensor>& log_b) {
  const int64_t B = cost.size(0);
  const at::Tensor c = cost.to(acc_of(cost.scalar_type()));
  const at::Tensor bad_cost = c.isnan().logical_or_(c.isneginf()).flatten(1).any(1);
  auto r = first_bad(bad_cost);
  KDK_CHECK(kOp, r.first < 0, sinkhorn_msg_cost_nan(r.first));
  for (auto* p : {&log_a, &log_b}) {
    if (!p->has_value()) continue;
    r = first_bad((*p)->isnan().logical_or_((*p)->isposinf()).any(1));
    KDK_CHECK(kOp, r.first < 0, sinkhorn_msg_marginal(p == &log_a ? "log_a" : "log_b", r.first));
  }
  const at::Tensor row_on = log_a.has_value() ? log_a->isneginf().logical_not_() : at::ones({B, cost.size(1)},
                                                                                          c.options().dtype(at::kBool));
  const at::Tensor col_on = log_b.has_value() ? log_b->isneginf().logical_not_() : at::ones({B, cost.size(2)},
                                                                                          c.options().dtype(at::kBool));
  // A problem without a present row or column is empty (value 0): nothing to check there.
  const at::Tensor live = row_on.any(1).logical_and_(col_on.any(1));
  const at::Tensor ok = c.isfinite();
  const at::Tensor row_ok = ok.logical_and(col_on.unsqueeze(1)).any(2);
  r = first_bad(row_on.logical_and(row_ok.logical_not()).logical_and_(live.unsqueeze(1)));
  KDK_CHECK(kOp, r.first < 0, sinkhorn_msg_row(r.first, r.second));
  const at::Tensor col_ok = ok.logical_and(row_on.unsqueeze(2)).any(1);
  r = first_bad(col_on.logical_and(col_ok.logical_not()).logical_and_(live.unsqueeze(1)));
  KDK_CHECK(kOp, r.first < 0, sinkhorn_msg_col(r.first, r.second));
}

SinkhornCostArgs sinkhorn_cost_parse(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                     const std::string& cost) {
  SinkhornCostArgs a{};
  KDK_CHECK(kLossOp, cost == "l1" || cost == "sqeuclidean", "cost must be 'l1' or 'sqeuclidean': got '", cost, "'");
  a.kind = cost == "l1" ? kCostL1 : kCostSqEuclidean;
  KDK_CHECK(kLossOp, temperature > 0, "temperature must be > 0: got ", temperature);
  a.temperature = temperature;
  KDK_CHECK(kLossOp, is_kernel_float(student.scalar_type()),
            "student_logits must be float32, float16, bfloat16 or float64: got ", dtype_str(student.scalar_type()));
  KDK_CHECK(kLossOp, is_kernel_float(teacher.scalar_type()),
            "teacher_logits must be float32, float16, bfloat16 or float64: got ", dtype_str(teacher.scalar_type()));
  KDK_CHECK(kLossOp, student.dim() == 3, "student_logits must be 3-D (B, n, C) for the raw op: got shape ",
            shape_str(student.sizes()));
  KDK_CHECK(kLossOp, teacher.dim() == 3, "teacher_logits must be 3-D (B, m, C) for the raw op: got shape ",
            shape_str(teacher.sizes()));
  KDK_CHECK(kLossOp, teacher.device() == student.device(),
            "teacher_logits must be on the device of student_logits: expected ", student.device().str(), ", got ",
            teacher.device().str());
  KDK_CHECK(kLossOp, teacher.size(2) == student.size(2),
            "teacher_logits must have the class dimension of student_logits: expected C = ", student.size(2),
            ", got C = ", teacher.size(2));
  KDK_CHECK(kLossOp, teacher.size(0) == student.size(0),
            "teacher_logits must hold as many problems as student_logits: expected B = ", student.size(0),
            ", got B = ", teacher.size(0));
  KDK_CHECK(kLossOp, student.size(0) >= 1 && student.size(1) >= 1 && teacher.size(1) >= 1 && student.size(2) >= 1,
            "student_logits and teacher_logits must be non-empty: got shapes ", shape_str(student.sizes()), " and ",
            shape_str(teacher.sizes()));
  a.B = student.size(0);
  a.n = student.size(1);
  a.m = teacher.size(1);
  a.C = student.size(2);
  return a;
}

std::string sinkhorn_msg_logits(const char* name, int64_t b, int64_t i) {
  return std::string(name) + " must be finite: found a non-finite value in problem " + std::to_string(b) +
         ", row " + std::to_string(i);
}

void sinkhorn_cost_validate(const at::Tensor& student, const at::Tensor& teacher) {
  for (const at::Tensor* t : {&student, &teacher}) {
    const at::Tensor bad = t->isfinite().logical_not_().any(2);
    const auto r = first_bad(bad);
    KDK_CHECK(kLossOp, r.first < 0,
              sinkhorn_msg_logits(t == &student ? "student_logits" : "teacher_logits", r.first, r.second));
  }
}

}  // namespace kdk
