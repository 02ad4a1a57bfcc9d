// Argument checks whose messages name the op, the argument, what was expected and what was given.
#pragma once
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace kdk {

// Shapes print as Python tuples, so C++ and Python messages read the same: (4, 7), (4,), ().
inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// torch.float32 etc., as Python prints dtypes.
inline std::string dtype_str(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kInt: return "torch.int32";
    case c10::kLong: return "torch.int64";
    case c10::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_kernel_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

}  // namespace kdk

// ValueError in Python, message "kdkernels.<op>: <what>".
#define KDK_CHECK(op, cond, ...) TORCH_CHECK_VALUE((cond), "kdkernels.", op, ": ", __VA_ARGS__)
