// torch.ops.adaptive_lr.active_step_: one in-place op for every Active optimizer, stepping a whole
// bucket (all tensors of one device and dtype) in one call with the kernel its `kernel` argument
// names (adaptive_lr/math.h's ADAPTIVE_LR_KERNELS). The CPU implementation validates every tensor
// and hyperparameter before touching any (active_args.h), then runs the fused kernels of
// csrc/cpu; built against a CUDA torch, the same op runs the kernels of csrc/cuda on CUDA tensors
// (cuda/ops_cuda.cpp). The Meta implementation does nothing, which is all torch.compile needs of
// an op that mutates its inputs and returns nothing. kernel_names and kernel_signature report the
// kernels and what their tags declare, for Python to order `hyper` by name and to check.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "active_args.h"
#include "cpu/fused_step.h"
#ifdef ADAPTIVE_LR_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace adaptive_lr {
namespace {

using at::Tensor;
using at::TensorList;

double read_lr(const Tensor& lr) {
  return lr.scalar_type() == at::kDouble ? *lr.const_data_ptr<double>()
                                         : *lr.const_data_ptr<float>();
}

constexpr const char* kOp = "active_step_";

// Validate, then (unless found_inf skips the step) increment the steps and derive each tensor's
// scalars, then run the kernels over the chunk table.
template <class Kernel>
void cpu_step(const ActiveArgs& a, const std::vector<NamedList>& states,
              typename Kernel::Hyper hyper) {
  validate(kOp, a, states, at::kCPU);
  const double lr = read_lr(a.lr);
  hyper.lr = lr;
  const bool skip = a.found_inf && *a.found_inf->const_data_ptr<float>() != 0;
  const auto boundary = static_cast<Boundary>(a.boundary);
  if (skip && boundary == Boundary::kNone) return;

  const CommonHyper common = common_hyper(
      a.gain_inc, a.gain_dec, a.min_gain, a.max_gain, a.sign_threshold, a.relax_gains,
      a.epoch_steps,
      a.weight_decay, a.maximize, lr, a.grad_scale ? a.grad_scale->const_data_ptr<float>() : nullptr);
  const size_t n = a.params.size();
  std::vector<cpu::TensorPtrs<Kernel>> tensors(n);
  std::vector<typename Kernel::Scalars> scalars(n);
  std::vector<double> sign_test_factors(n);
  const bool compact = is_compact(a);
  std::vector<uint32_t> rounding_keys(compact ? n : 0);
  std::vector<int64_t> numels(n);
  int64_t numel = 0;
  for (size_t i = 0; i < n; ++i) {
    cpu::TensorPtrs<Kernel>& t = tensors[i];
    t = {a.params[i].data_ptr(),
         a.grads[i].const_data_ptr(),
         a.gains[i].data_ptr(),
         a.grad_sums[i].data_ptr(),
         a.grad_sq_sums.empty() ? nullptr : a.grad_sq_sums[i].data_ptr(),
         a.prev_signs[i].data_ptr<int8_t>(),
         {}};
    for (size_t k = 0; k < states.size(); ++k) t.state[k] = states[k].tensors[i].data_ptr();
    float& step = *a.steps[i].data_ptr<float>();
    sign_test_factors[i] = sign_test_factor<Kernel>(common, hyper, static_cast<double>(step));
    const float next_step = step + 1;  // float32, like the reference's steps[i].add_(1)
    // (a skipped step's boundary rounds a compact gain with the key its step would have had)
    if (compact) {
      rounding_keys[i] = rounding_key(static_cast<uint32_t>(a.rounding_seeds[i]),
                                      static_cast<uint32_t>(next_step));
    }
    if (!skip) {
      step = next_step;
      scalars[i] = Kernel::step_scalars(hyper, static_cast<double>(step));
    }
    numels[i] = a.params[i].numel();
    numel += numels[i];
  }
  const std::vector<Chunk> chunks =
      make_chunks(numels.data(), static_cast<int32_t>(n), cpu::kChunkSize);

  cpu::step(cpu::Bucket<Kernel>{to_dtype(a.params[0].scalar_type()), boundary, skip,
                                state_precision(a, states),
                                common, hyper, tensors.data(), scalars.data(),
                                sign_test_factors.data(), rounding_keys.data(), chunks.data(),
                                static_cast<int64_t>(chunks.size()), numel});
}

// One kernel's step: its hyperparameters and state lists checked, then the device's kernels.
template <class Kernel>
void step(const char* kernel, const ActiveArgs& a, TensorList states,
          c10::ArrayRef<double> hyper_values) {
  TORCH_CHECK(a.sign_threshold >= 0 && a.sign_threshold < INFINITY, kOp,
              ": sign_threshold must be finite and >= 0, got ", a.sign_threshold);
  TORCH_CHECK(!a.relax_gains || a.sign_threshold > 0, kOp,
              ": relax_gains needs the sign test (sign_threshold > 0)");
  // a kernel without a second moment keeps its sign test's sum of g^2 while the test is on
  const size_t grad_sq_sums =
      kKeepsGradSqSum<Kernel> && a.sign_threshold > 0 ? a.params.size() : 0;
  TORCH_CHECK(a.grad_sq_sums.size() == grad_sq_sums, kOp, ": kernel '", kernel,
              "' with sign_threshold ", a.sign_threshold, " takes ", grad_sq_sums,
              " grad_sq_sums (one per param where its sign test reads the epoch's sum of g^2), "
              "got ", a.grad_sq_sums.size());
  TORCH_CHECK(a.epoch_steps >= 0, kOp, ": epoch_steps must be >= 0, got ", a.epoch_steps);
  const typename Kernel::Hyper hyper = parse_hyper<Kernel>(kOp, kernel, hyper_values);
  const std::vector<NamedList> lists =
      state_lists<Kernel>(kOp, kernel, hyper, states, a.params.size());
  TORCH_CHECK(kMomentsInBfloat16<Kernel> || !moments_in_bfloat16(lists), kOp, ": kernel '", kernel,
              "' keeps a second moment, which stays float32 (docs/precision.md); bfloat16 "
              "moments are for kernels whose state is momenta");
#ifdef ADAPTIVE_LR_WITH_CUDA
  if (!a.params.empty() && a.params[0].defined() && a.params[0].is_cuda()) {
    return cuda::fused_step<Kernel>(kOp, a, lists, hyper);  // the kernels read a.lr
  }
#endif
  cpu_step<Kernel>(a, lists, hyper);
}

// Calls f(Kernel{}, name) with the tag of the kernel named `kernel` (ADAPTIVE_LR_KERNELS); an
// unknown name fails, listing the kernels.
template <class F>
void with_kernel(const char* op, std::string_view kernel, F&& f) {
#define ADAPTIVE_LR_DISPATCH(name, Kernel) \
  if (kernel == #name) return f(Kernel{}, #name);
  ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_DISPATCH)
#undef ADAPTIVE_LR_DISPATCH
#define ADAPTIVE_LR_NAME(name, Kernel) " " #name
  TORCH_CHECK(false, op, ": unknown kernel '", kernel,
              "'; the kernels are" ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_NAME));
#undef ADAPTIVE_LR_NAME
}

void active_step_(std::string_view kernel, TensorList params, TensorList grads, TensorList gains,
                  TensorList grad_sums, TensorList grad_sq_sums, TensorList prev_signs,
                  TensorList steps, TensorList states, const Tensor& lr,
                  c10::ArrayRef<double> hyper, double weight_decay, bool maximize,
                  double gain_inc, double gain_dec, double min_gain, double max_gain,
                  double sign_threshold, bool relax_gains, int64_t epoch_steps, int64_t boundary,
                  const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                  c10::ArrayRef<int64_t> rounding_seeds) {
  const ActiveArgs args{params,      grads,          gains,    grad_sums,  grad_sq_sums,
                        prev_signs,  steps,          lr,       weight_decay, maximize,
                        gain_inc,    gain_dec,       min_gain, max_gain,   sign_threshold,
                        relax_gains,
                        epoch_steps, rounding_seeds, boundary, grad_scale, found_inf};
  with_kernel(kOp, kernel, [&](auto tag, const char* name) {
    step<decltype(tag)>(name, args, states, hyper);
  });
}

// Every kernel's name, in ADAPTIVE_LR_KERNELS's order.
std::vector<std::string> kernel_names() {
#define ADAPTIVE_LR_NAME(name, Kernel) #name,
  return {ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_NAME)};
#undef ADAPTIVE_LR_NAME
}

// What a kernel's tag declares about its arguments (math.h): its hyperparameters' names in the
// op's `hyper` order (kHyper), its states' names in the op's `states` order (kStates) and the
// index of the state its sign test reads (kSecondMoment; -1: none). The fused backends order the
// spec's hyperparameters by these names; tests/test_kernel_metadata.py checks them against the
// specs and the Triton updates.
std::tuple<std::vector<std::string>, std::vector<std::string>, int64_t> kernel_signature(
    std::string_view kernel) {
  std::tuple<std::vector<std::string>, std::vector<std::string>, int64_t> signature;
  with_kernel("kernel_signature", kernel, [&](auto tag, const char*) {
    using Kernel = decltype(tag);
    auto& [hyper, states, second_moment] = signature;
    for (const HyperSpec& h : Kernel::kHyper) hyper.emplace_back(h.name);
    for (const char* s : Kernel::kStates) states.emplace_back(s);
    second_moment = Kernel::kSecondMoment;
  });
  return signature;
}

// A no-op with the signature of F: the Meta (and so fake-tensor) kernel of a mutating op.
template <class F>
struct NoOp;
template <class... Args>
struct NoOp<void(Args...)> {
  static void fn(Args...) {}
};

}  // namespace

TORCH_LIBRARY(adaptive_lr, m) {
  m.def("active_step_(str kernel, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] gains, "
        "Tensor(c!)[] grad_sums, Tensor(g!)[] grad_sq_sums, Tensor(d!)[] prev_signs, "
        "Tensor(e!)[] steps, Tensor(f!)[] states, Tensor lr, float[] hyper, float weight_decay, "
        "bool maximize, float gain_inc, float gain_dec, float min_gain, float max_gain, "
        "float sign_threshold, bool relax_gains, int epoch_steps, int boundary, "
        "Tensor? grad_scale, Tensor? found_inf, int[] rounding_seeds=[]) -> ()");
  // the SIMD build the cpu backend's kernels run, for benchmarks and tests to name
  m.def("cpu_capability() -> str", &cpu::kernel_capability);
  // each kernel's declaration of its arguments, for Python to check and order them by name
  m.def("kernel_names() -> str[]", &kernel_names);
  m.def("kernel_signature(str kernel) -> (str[] hyper, str[] states, int second_moment)",
        &kernel_signature);
}

TORCH_LIBRARY_IMPL(adaptive_lr, CPU, m) { m.impl("active_step_", &active_step_); }

#ifdef ADAPTIVE_LR_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptive_lr, CUDA, m) { m.impl("active_step_", &active_step_); }
#endif

TORCH_LIBRARY_IMPL(adaptive_lr, Meta, m) {
  m.impl("active_step_", &NoOp<decltype(active_step_)>::fn);
}

}  // namespace adaptive_lr

// `import adaptive_lr._C` loads this library, whose static initializers register the ops above.
extern "C" PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "adaptive_lr's fused kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
