// The arguments of torch.ops.adaptive_lr.active_step_ and their validation: shared by the CPU
// implementation (ops.cpp) and the CUDA one (cuda/ops_cuda.cpp), which differ only in the device
// every tensor must be on. What a kernel takes (its hyperparameters and state lists) comes from
// its tag in adaptive_lr/math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "adaptive_lr/math.h"

namespace adaptive_lr {

using OptionalTensor = std::optional<at::Tensor>;

// The arguments of the op that every kernel uses alike.
struct ActiveArgs {
  at::TensorList params, grads, gains, grad_sums;
  // the sign test's epoch sums of g^2, as grad_sums, for a kernel without a second moment while
  // the test is on (math.h, kKeepsGradSqSum); else empty (the op checks which)
  at::TensorList grad_sq_sums;
  at::TensorList prev_signs, steps;
  const at::Tensor& lr;
  double weight_decay;
  bool maximize;
  double gain_inc, gain_dec, min_gain, max_gain;
  double sign_threshold;  // > 0: the sign test
  bool relax_gains;       // the sign test's held gains above 1 move toward 1
  int64_t epoch_steps;    // the length of the epoch that ended (the sign test's S)
  // compact state (bfloat16 gains and grad_sums): each param's seed of the stochastic rounding
  // of its grad_sum (math.h, rounding_key); empty for float32 gains and grad_sums
  c10::ArrayRef<int64_t> rounding_seeds;
  int64_t boundary;
  const OptionalTensor& grad_scale;
  const OptionalTensor& found_inf;
};

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Whether a and b (of one shape) store their elements in the same order: equal strides in every
// dimension longer than 1 (the stride of a length-1 dimension is never used; nor is any of an
// empty tensor).
inline bool same_element_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Checks one tensor of a list: a strided tensor of the given dtype on `device`. The kernels read
// every tensor of index i as one flat array, so params[i] must fill its memory exactly once
// (contiguous, channels_last, transposed, ...) and every other tensor of index i must have its
// shape and element order (`like`; state made by zeros_like(param) has it).
inline void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t,
                         at::Device device, at::ScalarType dtype, const at::Tensor* like) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", list, "[", i, "] must be on ", device,
              ", got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", list, "[", i,
              "] must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", list, "[", i, "] must have dtype ", dtype,
              ", got ", t.scalar_type());
  // a layout the kernels cannot index raises NotImplementedError: the backend then runs that
  // param on copies (in the param's layout where it is dense, else contiguous)
  if (like == nullptr) {
    TORCH_CHECK_NOT_IMPLEMENTED(t.is_non_overlapping_and_dense(), op, ": ", list, "[", i,
                                "] of shape ", t.sizes(), " and strides ", t.strides(),
                                " does not fill its memory exactly once; pass a contiguous copy");
    return;
  }
  TORCH_CHECK(t.sizes() == like->sizes(), op, ": ", list, "[", i, "] must have shape ",
              like->sizes(), " like params[", i, "], got ", t.sizes());
  TORCH_CHECK_NOT_IMPLEMENTED(same_element_order(t, *like), op, ": ", list, "[", i,
                              "] has strides ", t.strides(), " but params[", i, "] has strides ",
                              like->strides(), "; every tensor of a param must share its layout");
}

// The name of list entry `index` (-1: a tensor of its own), for error messages only: TORCH_CHECK
// formats its message only when the check fails, so a passing step builds no string.
struct Named {
  const char* name;
  int64_t index;
};

inline std::ostream& operator<<(std::ostream& out, const Named& n) {
  out << n.name;
  if (n.index >= 0) out << "[" << n.index << "]";
  return out;
}

// steps[i], grad_scale and found_inf: one float32 on `device`.
inline void check_scalar_tensor(const char* op, Named name, const at::Tensor& t,
                                at::Device device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == device && t.layout() == at::kStrided &&
                  t.scalar_type() == at::kFloat && t.numel() == 1,
              op, ": ", name, " must be a one-element float32 tensor on ", device, ", got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// lr is a tensor in the schema (a 0-dim lr that a scheduler updates in place then needs no new
// graph under torch.compile or CUDA graphs), read where the kernels run: by the host for CPU
// tensors, by the kernels from device memory for CUDA tensors.
inline void check_lr(const char* op, const at::Tensor& lr, at::Device device) {
  TORCH_CHECK(lr.device() == device && lr.layout() == at::kStrided && lr.numel() == 1 &&
                  (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble),
              op, ": lr must be a one-element float32 or float64 tensor on ", device, ", got ",
              lr.scalar_type(), " of shape ", lr.sizes(), " on ", lr.device());
}

// Compact state is named by the dtype of gains[0] (validate checks that every list agrees).
inline bool is_compact(const ActiveArgs& a) {
  return !a.gains.empty() && a.gains[0].defined() && a.gains[0].scalar_type() == at::kBFloat16;
}

// bfloat16 moments (state_precision="bfloat16") are named by the dtype of the first state list's
// first tensor (moments are never bfloat16 otherwise; validate checks that every one agrees).
inline bool moments_in_bfloat16(const std::vector<NamedList>& states) {
  return !states.empty() && !states[0].tensors.empty() && states[0].tensors[0].defined() &&
         states[0].tensors[0].scalar_type() == at::kBFloat16;
}

inline StatePrecision state_precision(const ActiveArgs& a, const std::vector<NamedList>& states) {
  if (!is_compact(a)) return StatePrecision::kFull;
  return moments_in_bfloat16(states) ? StatePrecision::kBfloat16 : StatePrecision::kCompact;
}

// Everything is checked before anything is written, so a failing step changes nothing. Every
// tensor must be on the device of params[0], which must be of type `device_type`.
inline void validate(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states,
                     at::DeviceType device_type) {
  TORCH_CHECK(a.boundary >= 0 && a.boundary <= 2, op,
              ": boundary must be 0 (none), 1 (roll) or 2 (update), got ", a.boundary);
  const size_t n = a.params.size();
  TORCH_CHECK(n > 0, op, ": params is empty");
  TORCH_CHECK(a.params[0].defined(), op, ": params[0] is undefined");
  const at::Device device = a.params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": this implementation steps ", device_type,
              " tensors, got params[0] on ", device);
  check_lr(op, a.lr, device);
  const std::vector<NamedList> lists = {{"grads", a.grads},         {"gains", a.gains},
                                        {"grad_sums", a.grad_sums}, {"prev_signs", a.prev_signs},
                                        {"steps", a.steps}};
  for (const auto& list : {lists, states}) {
    for (const NamedList& l : list) {
      TORCH_CHECK(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                  " tensors but params has ", n);
    }
  }
  const at::ScalarType dtype = a.params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": params must be float32, float64, bfloat16 or float16, got ", dtype);
  const at::ScalarType state_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const bool compact = is_compact(a);
  const at::ScalarType sign_state_dtype = compact ? at::kBFloat16 : at::kFloat;
  if (compact) {
    TORCH_CHECK(dtype != at::kDouble, op,
                ": compact state (bfloat16 gains and grad_sums) is for float32, bfloat16 and "
                "float16 params; float64 params keep float32 gains and grad_sums");
    TORCH_CHECK(a.rounding_seeds.size() == n, op, ": compact state needs one rounding seed per "
                "param, got ", a.rounding_seeds.size(), " for ", n, " params");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(a.rounding_seeds[i] >= 0 && a.rounding_seeds[i] <= 0xffffffffLL, op,
                  ": rounding_seeds[", i, "] must be in [0, 2**32), got ", a.rounding_seeds[i]);
    }
  } else {
    TORCH_CHECK(a.rounding_seeds.empty(), op, ": rounding_seeds are for compact state (bfloat16 "
                "gains and grad_sums); float32 ones take none, got ", a.rounding_seeds.size());
  }
  const bool bfloat16_moments = moments_in_bfloat16(states);
  TORCH_CHECK(!bfloat16_moments || compact, op, ": bfloat16 moments (state_precision="
              "\"bfloat16\") need compact state too: bfloat16 gains and grad_sums");
  const at::ScalarType moment_dtype = bfloat16_moments ? at::kBFloat16 : state_dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    check_tensor(op, "params", i, p, device, dtype, nullptr);
    check_tensor(op, "grads", i, a.grads[i], device, dtype, &p);
    check_tensor(op, "gains", i, a.gains[i], device, sign_state_dtype, &p);
    check_tensor(op, "grad_sums", i, a.grad_sums[i], device, sign_state_dtype, &p);
    if (!a.grad_sq_sums.empty()) {
      check_tensor(op, "grad_sq_sums", i, a.grad_sq_sums[i], device, sign_state_dtype, &p);
    }
    check_tensor(op, "prev_signs", i, a.prev_signs[i], device, at::kChar, &p);
    for (const NamedList& s : states) {
      check_tensor(op, s.name, i, s.tensors[i], device, moment_dtype, &p);
    }
    check_scalar_tensor(op, {"steps", static_cast<int64_t>(i)}, a.steps[i], device);
  }
  if (a.grad_scale) check_scalar_tensor(op, {"grad_scale", -1}, *a.grad_scale, device);
  if (a.found_inf) check_scalar_tensor(op, {"found_inf", -1}, *a.found_inf, device);
}


namespace detail {

template <class Item, std::size_t N, class Name>
std::string join(const Item (&items)[N], std::size_t count, const Name& name) {
  std::string out;
  for (std::size_t k = 0; k < count; ++k) out += (k ? ", " : "") + std::string(name(items[k]));
  return out;
}

inline void check_hyper_value(const char* op, const char* kernel, const HyperSpec& spec,
                              double v) {
  const auto fail = [&](const char* range) {
    TORCH_CHECK(false, op, ": ", kernel, "'s ", spec.name, " must be ", range, ", got ", v);
  };
  switch (spec.range) {
    case HyperRange::kFlag: if (!(v == 0 || v == 1)) fail("0 or 1 (a flag)"); break;
    case HyperRange::kNonNegative: if (!(v >= 0)) fail(">= 0"); break;
    case HyperRange::kBeta: if (!(v >= 0 && v < 1)) fail("in [0, 1)"); break;
    case HyperRange::kUnit: if (!(v >= 0 && v <= 1)) fail("in [0, 1]"); break;
  }
}

}  // namespace detail

// The kernel's hyperparameters from the op's `hyper` list (its lr is set where lr is read).
template <class Kernel>
typename Kernel::Hyper parse_hyper(const char* op, const char* kernel,
                                   c10::ArrayRef<double> values) {
  constexpr std::size_t count = std::size(Kernel::kHyper);
  TORCH_CHECK(values.size() == count, op, ": ", kernel, " takes ", count, " hyperparameters (",
              detail::join(Kernel::kHyper, count, [](const HyperSpec& h) { return h.name; }),
              "), got ", values.size());
  for (std::size_t k = 0; k < count; ++k) {
    detail::check_hyper_value(op, kernel, Kernel::kHyper[k], values[k]);
  }
  return Kernel::make_hyper(0.0, values.data());
}

// The op's state-major `states` (states[k * n + i]: state k of tensor i) as one named list per
// state the kernel uses with these hyperparameters.
template <class Kernel>
std::vector<NamedList> state_lists(const char* op, const char* kernel,
                                   const typename Kernel::Hyper& hyper, at::TensorList states,
                                   std::size_t n) {
  const std::size_t count = static_cast<std::size_t>(hyper.num_states());
  TORCH_CHECK(states.size() == count * n, op, ": ", kernel, " with these hyperparameters keeps ",
              count, " states per param (",
              detail::join(Kernel::kStates, count, [](const char* name) { return name; }),
              "), so states must hold ", count, " * ", n, " = ", count * n,
              " tensors (state-major), got ", states.size());
  std::vector<NamedList> lists;
  for (std::size_t k = 0; k < count; ++k) {
    lists.push_back({Kernel::kStates[k], states.slice(k * n, n)});
  }
  return lists;
}

}  // namespace adaptive_lr
