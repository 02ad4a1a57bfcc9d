// The global memory an emulated op may touch: its tensor arguments' storages and what it allocates.
#pragma once
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace kdk_emu {

// ---- ops: the global memory a launch may touch -----------------------------------------------------
// While an emulated op runs, its tensor arguments' storages are valid global memory, and tensors it
// allocates come from a tracking allocator with red zones (valid until freed).
struct OpScope {
  OpScope();
  ~OpScope();
  void add(const at::Tensor& t);
  void add(const std::optional<at::Tensor>& t) {
    if (t.has_value()) add(*t);
  }
  template <class T> void add(const T&) {}
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
};
template <class Sig, Sig* F> struct OpEntry;
template <class R, class... A, R (*F)(A...)> struct OpEntry<R(A...), F> {
  static R call(A... a) {
    OpScope scope;
    (scope.add(a), ...);
    return F(a...);
  }
};

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

}  // namespace kdk_emu
