// Argument parsing of the token-relation ops and the feature preparation both backends share
// (token order for masks, heads, cosine normalisation and its backward), as ATen ops on either device.
#include "common/token_relation_args.h"

#include <cmath>

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/token_relation_math.h"

namespace kdk {

static constexpr const char* kRel = "token_relation_loss";
static constexpr const char* kCon = "token_contrastive_loss";

static bool parse_similarity(const char* op, const std::string& s) {
  KDK_CHECK(op, s == "dot" || s == "cosine", "similarity must be 'dot' or 'cosine': got '", s, "'");
  return s == "cosine";
}

// The checks both ops make on (student, teacher, mask); the widths are each op's own business.
static void check_features(const char* op, const at::Tensor& s, const at::Tensor& t,
                           const c10::optional<at::Tensor>& mask) {
  KDK_CHECK(op, is_kernel_float(s.scalar_type()),
            "student_feats must be float32, float16, bfloat16 or float64: got ", dtype_str(s.scalar_type()));
  KDK_CHECK(op, is_kernel_float(t.scalar_type()),
            "teacher_feats must be float32, float16, bfloat16 or float64: got ", dtype_str(t.scalar_type()));
  KDK_CHECK(op, s.dim() == 3, "student_feats must be 3-D (B, T, Ds): got shape ", shape_str(s.sizes()));
  KDK_CHECK(op, t.dim() == 3, "teacher_feats must be 3-D (B, T, Dt): got shape ", shape_str(t.sizes()));
  KDK_CHECK(op, t.device() == s.device(), "teacher_feats must be on the device of student_feats: expected ",
            s.device().str(), ", got ", t.device().str());
  KDK_CHECK(op, t.size(0) == s.size(0) && t.size(1) == s.size(1),
            "teacher_feats must have the (B, T) of student_feats: expected ", shape_str(s.sizes().slice(0, 2)),
            ", got ", shape_str(t.sizes().slice(0, 2)));
  KDK_CHECK(op, s.size(1) >= 1, "student_feats must have T >= 1 tokens: got shape ", shape_str(s.sizes()));
  KDK_CHECK(op, s.size(2) >= 1, "student_feats must have a non-empty feature dimension: got shape ",
            shape_str(s.sizes()));
  KDK_CHECK(op, t.size(2) >= 1, "teacher_feats must have a non-empty feature dimension: got shape ",
            shape_str(t.sizes()));
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    KDK_CHECK(op, m.device() == s.device(), "mask must be on the device of student_feats: expected ",
              s.device().str(), ", got ", m.device().str());
    KDK_CHECK(op, m.dim() == 2 && m.size(0) == s.size(0) && m.size(1) == s.size(1),
              "mask must have the (B, T) of student_feats: expected ", shape_str(s.sizes().slice(0, 2)), ", got ",
              shape_str(m.sizes()));
    KDK_CHECK(op, m.scalar_type() == at::kBool, "mask must be bool for the raw op: got ", dtype_str(m.scalar_type()));
  }
}

RelationArgs token_relation_parse(const at::Tensor& student, const at::Tensor& teacher,
                                  const c10::optional<at::Tensor>& mask, const std::string& loss,
                                  const std::string& similarity, int64_t num_heads, double temperature, double tau) {
  RelationArgs a;
  KDK_CHECK(kRel, loss == "kl" || loss == "mse", "loss must be 'kl' or 'mse': got '", loss, "'");
  a.loss = loss == "kl" ? kRelKL : kRelMSE;
  a.cosine = parse_similarity(kRel, similarity);
  KDK_CHECK(kRel, num_heads >= 1, "num_heads must be >= 1: got ", num_heads);
  KDK_CHECK(kRel, temperature > 0, "temperature must be > 0: got ", temperature);
  KDK_CHECK(kRel, tau > 0, "tau must be > 0: got ", tau);
  check_features(kRel, student, teacher, mask);
  a.P = student.size(0);
  a.n = student.size(1);
  a.H = num_heads;
  a.Ds = student.size(2);
  a.Dt = teacher.size(2);
  KDK_CHECK(kRel, a.Ds % a.H == 0, "num_heads must divide Ds = ", a.Ds, " (the width of student_feats): got num_heads = ",
            a.H);
  KDK_CHECK(kRel, a.Dt % a.H == 0, "num_heads must divide Dt = ", a.Dt, " (the width of teacher_feats): got num_heads = ",
            a.H);
  a.ds = a.Ds / a.H;
  a.dt = a.Dt / a.H;
  if (a.cosine) {
    a.beta_s = a.beta_t = 1.0 / (tau * temperature);
  } else {
    a.beta_s = 1.0 / (std::sqrt(static_cast<double>(a.ds)) * temperature);
    a.beta_t = 1.0 / (std::sqrt(static_cast<double>(a.dt)) * temperature);
  }
  return a;
}

ContrastiveArgs token_contrastive_parse(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& mask, const std::string& similarity,
                                        double tau) {
  ContrastiveArgs a;
  a.cosine = parse_similarity(kCon, similarity);
  KDK_CHECK(kCon, tau > 0, "tau must be > 0: got ", tau);
  check_features(kCon, student, teacher, mask);
  KDK_CHECK(kCon, teacher.size(2) == student.size(2),
            "teacher_feats must have the width of student_feats (project the student first): expected D = ",
            student.size(2), ", got D = ", teacher.size(2));
  a.P = student.size(0);
  a.n = student.size(1);
  a.D = student.size(2);
  a.beta = 1.0 / tau;
  return a;
}

static at::ScalarType acc_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void token_relation_check_saved(const RelationArgs& a, const at::Tensor& grad_loss, const at::Tensor& stat,
                                const at::Tensor& student) {
  KDK_CHECK(kRel, grad_loss.dim() == 2 && grad_loss.size(0) == a.P && grad_loss.size(1) == a.n,
            "grad_loss must have shape (B, T) = ", shape_str({a.P, a.n}), ": got ", shape_str(grad_loss.sizes()));
  KDK_CHECK(kRel, stat.dim() == 4 && stat.size(0) == a.P && stat.size(1) == a.H && stat.size(2) == a.n &&
                      stat.size(3) == kRelStats && stat.scalar_type() == acc_of(student),
            "stat must be the forward's statistics: expected ", shape_str({a.P, a.H, a.n, kRelStats}), " ",
            dtype_str(acc_of(student)), ", got ", shape_str(stat.sizes()), " ", dtype_str(stat.scalar_type()));
  KDK_CHECK(kRel, grad_loss.device() == student.device() && stat.device() == student.device(),
            "grad_loss and stat must be on the device of student_feats: expected ", student.device().str());
}

void token_contrastive_check_saved(const ContrastiveArgs& a, const at::Tensor& grad_loss, const at::Tensor& lse,
                                   const at::Tensor& student) {
  KDK_CHECK(kCon, grad_loss.dim() == 2 && grad_loss.size(0) == a.P && grad_loss.size(1) == a.n,
            "grad_loss must have shape (B, T) = ", shape_str({a.P, a.n}), ": got ", shape_str(grad_loss.sizes()));
  KDK_CHECK(kCon, lse.dim() == 2 && lse.size(0) == a.P && lse.size(1) == a.n && lse.scalar_type() == acc_of(student),
            "lse must be the forward's statistics: expected ", shape_str({a.P, a.n}), " ", dtype_str(acc_of(student)),
            ", got ", shape_str(lse.sizes()), " ", dtype_str(lse.scalar_type()));
  KDK_CHECK(kCon, grad_loss.device() == student.device() && lse.device() == student.device(),
            "grad_loss and lse must be on the device of student_feats: expected ", student.device().str());
}

TokenOrder token_order(const c10::optional<at::Tensor>& mask) {
  TokenOrder o;
  if (!mask.has_value()) return o;
  const at::Tensor keep = mask->contiguous();
  // Valid tokens first, each group in its original order: a stable sort of "is masked".
  o.perm = std::get<1>(at::sort(keep.logical_not().to(at::kByte), /*stable=*/true, /*dim=*/1, /*descending=*/false));
  o.lens = keep.sum(1).to(at::kInt);
  return o;
}

static at::Tensor gather_rows(const at::Tensor& x, const TokenOrder& o) {
  if (!o.perm.defined()) return x;
  return x.gather(1, o.perm.unsqueeze(-1).expand({x.size(0), x.size(1), x.size(2)}));
}

at::Tensor token_heads(const at::Tensor& x, const TokenOrder& o, int64_t H, bool cosine, at::ScalarType dtype) {
  const int64_t P = x.size(0), n = x.size(1), D = x.size(2), dh = D / H;
  // Nothing to reorder, split or normalise: the features themselves (the kernels only read them), detached
  // (a view of a tensor that requires grad reports requires_grad even under no_grad, and at::mm_out refuses it).
  if (!o.perm.defined() && H == 1 && !cosine && x.scalar_type() == dtype && x.is_contiguous())
    return x.detach().view({P, 1, n, D});
  at::Tensor out = at::empty({P, H, n, dh}, x.options().dtype(dtype));
  out.copy_(gather_rows(x, o).reshape({P, n, H, dh}).permute({0, 2, 1, 3}));
  if (cosine)  // in place; the norms in float32 (float64 for float64 input)
    out.div_(at::linalg_vector_norm(out, 2, at::IntArrayRef{-1}, /*keepdim=*/true, acc_of(x)).clamp_min(kCosineEps));
  return out;
}

at::Tensor token_heads_backward(const at::Tensor& g, const at::Tensor& x, const TokenOrder& o, int64_t H,
                                bool cosine) {
  const int64_t P = x.size(0), n = x.size(1), D = x.size(2), dh = D / H;
  at::Tensor gh = g.permute({0, 2, 1, 3});  // (P, n, H, dh), a view of g: updated in place below
  if (cosine) {
    // d (x / max(|x|, eps)) = (g - y (y . g)) / |x| where |x| >= eps, g / eps below (the clamp is constant
    // there): with y set to 0 below eps both are (g - y (y . g)) / max(|x|, eps).
    at::Tensor y = at::empty({P, n, H, dh}, g.options());
    y.copy_(gather_rows(x, o).reshape({P, n, H, dh}));
    const at::Tensor nrm = at::linalg_vector_norm(y, 2, at::IntArrayRef{-1}, /*keepdim=*/true);
    const at::Tensor den = nrm.clamp_min(kCosineEps);
    y.div_(den).masked_fill_(nrm < kCosineEps, 0);
    const at::Tensor proj = (y * gh).sum(-1, /*keepdim=*/true);
    gh.sub_(y.mul_(proj)).div_(den);
  }
  at::Tensor gx = gh.reshape({P, n, D});
  if (o.perm.defined()) {
    gx = at::zeros({P, n, D}, gx.options()).scatter_(1, o.perm.unsqueeze(-1).expand({P, n, D}), gx);
  }
  return gx.to(x.scalar_type()).contiguous();
}

at::Tensor token_unorder_rows(const at::Tensor& v, const TokenOrder& o) {
  if (!o.perm.defined()) return v;
  return at::zeros_like(v).scatter_(1, o.perm, v);
}

at::Tensor token_order_rows(const at::Tensor& v, const TokenOrder& o) {
  if (!o.perm.defined()) return v;
  return v.gather(1, o.perm);
}

}  // namespace kdk
