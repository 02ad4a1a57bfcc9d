// Argument parsing and id validation of the top-k KL ops (one place for every refusal's text).
#include "common/topk_kl_args.h"

#include <cmath>

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/topk_kl_math.h"

namespace kdk {

static constexpr const char* kOp = "topk_kl_div";

static int parse_mode(const std::string& m) {
  if (m == "renorm") return kRenorm;
  if (m == "tail") return kTail;
  if (m == "support") return kSupport;
  if (m == "dense") return kDense;
  KDK_CHECK(kOp, false, "mode must be one of 'renorm', 'tail', 'support', 'dense': got '", m, "'");
  return -1;
}

static int parse_divergence(const std::string& d) {
  if (d == "forward_kl") return kForwardKL;
  if (d == "reverse_kl") return kReverseKL;
  if (d == "jsd") return kJSD;
  if (d == "skew_forward_kl") return kSkewForwardKL;
  if (d == "skew_reverse_kl") return kSkewReverseKL;
  if (d == "tvd") return kTVD;
  KDK_CHECK(kOp, false, "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', "
            "'skew_reverse_kl', 'tvd': got '", d, "'");
  return -1;
}

static void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  KDK_CHECK(kOp, t.device() == ref.device(), name, " must be on the device of student_logits: expected ",
            ref.device().str(), ", got ", t.device().str());
}

TopkArgs topk_kl_parse(const at::Tensor& logits, const at::Tensor& values,
                       const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& row_mask,
                       const std::string& mode, const std::string& divergence, double param,
                       double temperature, bool values_are_logprobs, bool drop_out_of_range) {
  TopkArgs a;
  a.mode = parse_mode(mode);
  a.div = parse_divergence(divergence);
  a.param = param;
  a.temperature = temperature;
  a.logprobs = values_are_logprobs;
  a.drop = drop_out_of_range;
  KDK_CHECK(kOp, a.mode != kRenorm || a.div == kForwardKL,
            "mode='renorm' supports only divergence='forward_kl': got '", divergence, "'");
  KDK_CHECK(kOp, a.mode != kTail || values_are_logprobs,
            "mode='tail' needs values_are='logprobs' (the teacher's tail mass must be known): got 'logits'");
  KDK_CHECK(kOp, temperature > 0, "temperature must be > 0: got ", temperature);
  const char* pname = a.div == kJSD ? "beta" : "skew";
  KDK_CHECK(kOp, !(param < 0 || param > 1), pname, " must be in [0, 1]: got ", param);

  KDK_CHECK(kOp, is_kernel_float(logits.scalar_type()),
            "student_logits must be float32, float16, bfloat16 or float64: got ", dtype_str(logits.scalar_type()));
  KDK_CHECK(kOp, logits.dim() == 2, "student_logits must be 2-D (N, V) for the raw op: got shape ",
            shape_str(logits.sizes()));
  KDK_CHECK(kOp, logits.size(1) > 0, "student_logits must have a non-empty last (vocabulary) dimension: got shape ",
            shape_str(logits.sizes()));
  KDK_CHECK(kOp, is_kernel_float(values.scalar_type()),
            "teacher_values must be float32, float16, bfloat16 or float64: got ", dtype_str(values.scalar_type()));
  check_device(values, "teacher_values", logits);
  a.N = logits.size(0);
  a.V = logits.size(1);
  KDK_CHECK(kOp, values.dim() == 2 && values.size(0) == a.N,
            "teacher_values must have the leading shape of student_logits: expected ",
            shape_str(logits.sizes().slice(0, 1)), ", got ", shape_str(values.sizes().slice(0, values.dim() ? values.dim() - 1 : 0)));
  if (a.mode == kDense) {
    KDK_CHECK(kOp, !indices.has_value(), "mode='dense' takes no teacher_indices");
    KDK_CHECK(kOp, values.sizes() == logits.sizes(),
              "teacher_values must have the shape of student_logits for mode='dense': expected ",
              shape_str(logits.sizes()), ", got ", shape_str(values.sizes()));
    a.K = 0;
  } else {
    KDK_CHECK(kOp, indices.has_value(), "teacher_indices is required for mode='", mode, "'");
    const at::Tensor& idx = *indices;
    KDK_CHECK(kOp, idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "teacher_indices must be int32 or int64: got ", dtype_str(idx.scalar_type()));
    check_device(idx, "teacher_indices", logits);
    KDK_CHECK(kOp, idx.sizes() == values.sizes(), "teacher_indices must have the shape of teacher_values: expected ",
              shape_str(values.sizes()), ", got ", shape_str(idx.sizes()));
    a.K = values.size(1);
    KDK_CHECK(kOp, a.K >= 1, "teacher_values must have K >= 1 entries per row: got K = ", a.K);
    KDK_CHECK(kOp, a.K <= a.V, "teacher_values has more entries per row than the vocabulary: K = ", a.K,
              " > V = ", a.V);
  }
  if (row_mask.has_value()) {
    check_device(*row_mask, "mask", logits);
    KDK_CHECK(kOp, row_mask->scalar_type() == at::kBool && row_mask->dim() == 1 && row_mask->size(0) == a.N,
              "row_mask must be a bool tensor of shape (N,): expected ", shape_str({a.N}), " torch.bool, got ",
              shape_str(row_mask->sizes()), " ", dtype_str(row_mask->scalar_type()));
  }
  return a;
}

void topk_kl_check_inplace(const at::Tensor& logits) {
  KDK_CHECK(kOp, logits.is_contiguous(), "inplace_grad=True needs contiguous student_logits (the gradient is "
            "written over them): got strides ", shape_str(logits.strides()));
}

void topk_kl_logit_map(TopkArgs& a, double logit_scale, double softcap) {
  KDK_CHECK(kOp, logit_scale > 0 && std::isfinite(logit_scale), "logit_scale must be > 0: got ", logit_scale);
  KDK_CHECK(kOp, softcap >= 0 && std::isfinite(softcap), "softcap must be >= 0 (0 or None: no cap): got ", softcap);
  a.logit_scale = logit_scale;
  a.softcap = softcap;
}

void topk_kl_validate_ids(const at::Tensor& indices, int64_t V, bool drop) {
  if (indices.numel() == 0) return;
  if (!drop) {
    const at::Tensor bad = (indices < 0).logical_or_(indices >= V);
    if (bad.any().item<bool>()) {
      const int64_t found = indices.masked_select(bad)[0].item<int64_t>();
      KDK_CHECK(kOp, false, "teacher_indices out of range [0, ", V, "): found ", found,
                " (pass out_of_range='drop' to ignore ids outside the student vocabulary)");
    }
  }
  if (indices.size(1) < 2) return;
  const at::Tensor sorted = std::get<0>(indices.sort(1));
  at::Tensor dup = sorted.slice(1, 1).eq(sorted.slice(1, 0, -1));
  if (drop) dup.logical_and_(sorted.slice(1, 1) >= 0).logical_and_(sorted.slice(1, 1) < V);  // dropped ids may repeat
  if (dup.any().item<bool>()) {
    const at::Tensor where = dup.nonzero()[0];
    const int64_t row = where[0].item<int64_t>();
    const int64_t id = sorted.index({row, where[1].item<int64_t>()}).item<int64_t>();
    KDK_CHECK(kOp, false, "teacher_indices has a duplicate id within a row: row ", row, " repeats id ", id);
  }
}

void topk_kl_check_saved(const TopkArgs& a, const at::Tensor& logits, const at::Tensor& grad_loss,
                         const at::Tensor& lse, const at::Tensor& coef, const at::Tensor& stat) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check = [&](const at::Tensor& t, const char* name, std::vector<int64_t> shape, bool exact_dtype) {
    KDK_CHECK(kOp, t.device() == logits.device(), name, " must be on the device of logits (", logits.device(),
              "): got ", t.device());
    KDK_CHECK(kOp, t.sizes() == at::IntArrayRef(shape), name, " must have shape ", shape_str(shape), ": got ",
              shape_str(t.sizes()));
    KDK_CHECK(kOp, !exact_dtype || t.scalar_type() == acc, name, " must be ", dtype_str(acc), ": got ",
              dtype_str(t.scalar_type()));
    KDK_CHECK(kOp, exact_dtype || is_kernel_float(t.scalar_type()), name, " must be a floating tensor: got ",
              dtype_str(t.scalar_type()));
  };
  check(grad_loss, "grad_loss", {a.N}, false);
  check(lse, "lse", {a.N}, true);
  check(coef, "coef", {a.N, a.K}, true);
  check(stat, "stat", {a.N, kTopkStat}, true);
}

}  // namespace kdk
