// torch.ops.adaptive_lr: one in-place op per Active optimizer, stepping a whole bucket (all
// tensors of one device and dtype) in one call. The CPU implementation validates every tensor
// before touching any, then runs the fused kernels of csrc/cpu; the Meta implementations do
// nothing, which is all torch.compile needs of an op that mutates its inputs and returns nothing.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/fused_step.h"

namespace adaptive_lr {
namespace {

using at::Tensor;
using at::TensorList;
using OptionalTensor = std::optional<Tensor>;

// The arguments every Active optimizer's op has.
struct ActiveArgs {
  TensorList params, grads, gains, grad_sums, prev_signs, steps;
  const Tensor& lr;
  double weight_decay;
  bool maximize;
  double gain_inc, gain_dec, min_gain, max_gain;
  int64_t boundary;
  const OptionalTensor& grad_scale;
  const OptionalTensor& found_inf;
};

struct NamedList {
  const char* name;
  TensorList tensors;
};

// Whether a and b (of one shape) store their elements in the same order: equal strides in every
// dimension longer than 1 (the stride of a length-1 dimension is never used).
bool same_element_order(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Checks one tensor of a list: a CPU, strided tensor of the given dtype. The kernels read every
// tensor of index i as one flat array, so params[i] must fill its memory exactly once (contiguous,
// channels_last, transposed, ...) and every other tensor of index i must have its shape and
// element order (`like`; state made by zeros_like(param) has it).
void check_tensor(const char* op, const char* list, size_t i, const Tensor& t,
                  at::ScalarType dtype, const Tensor* like) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", list, "[", i, "] must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", list, "[", i,
              "] must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", list, "[", i, "] must have dtype ", dtype,
              ", got ", t.scalar_type());
  // a layout the kernels cannot index raises NotImplementedError: the cpu backend then runs that
  // param on contiguous copies
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

// steps[i], grad_scale and found_inf: one float32 on the CPU, read and written by the host.
void check_scalar_tensor(const char* op, const std::string& name, const Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided &&
                  t.scalar_type() == at::kFloat && t.numel() == 1,
              op, ": ", name, " must be a one-element float32 CPU tensor, got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

// lr is a tensor in the schema (a 0-dim lr that a scheduler updates in place then needs no new
// graph under torch.compile or CUDA graphs); the CPU kernels read it once on the host.
void check_lr(const char* op, const Tensor& lr) {
  TORCH_CHECK(lr.device().is_cpu() && lr.layout() == at::kStrided && lr.numel() == 1 &&
                  (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble),
              op, ": lr must be a one-element float32 or float64 CPU tensor, got ",
              lr.scalar_type(), " of shape ", lr.sizes(), " on ", lr.device());
}

double read_lr(const Tensor& lr) {
  return lr.scalar_type() == at::kDouble ? *lr.const_data_ptr<double>()
                                         : *lr.const_data_ptr<float>();
}

cpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat;
    case at::kDouble: return cpu::DType::kDouble;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    default: return cpu::DType::kHalf;  // the only other dtype validate() lets through
  }
}

// Everything is checked before anything is written, so a failing step changes nothing.
void validate(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states) {
  TORCH_CHECK(a.boundary >= 0 && a.boundary <= 2, op,
              ": boundary must be 0 (none), 1 (roll) or 2 (update), got ", a.boundary);
  const size_t n = a.params.size();
  TORCH_CHECK(n > 0, op, ": params is empty");
  check_lr(op, a.lr);
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
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = a.params[i];
    check_tensor(op, "params", i, p, dtype, nullptr);
    check_tensor(op, "grads", i, a.grads[i], dtype, &p);
    check_tensor(op, "gains", i, a.gains[i], at::kFloat, &p);
    check_tensor(op, "grad_sums", i, a.grad_sums[i], at::kFloat, &p);
    check_tensor(op, "prev_signs", i, a.prev_signs[i], at::kChar, &p);
    for (const NamedList& s : states) check_tensor(op, s.name, i, s.tensors[i], state_dtype, &p);
    check_scalar_tensor(op, "steps[" + std::to_string(i) + "]", a.steps[i]);
  }
  if (a.grad_scale) check_scalar_tensor(op, "grad_scale", *a.grad_scale);
  if (a.found_inf) check_scalar_tensor(op, "found_inf", *a.found_inf);
}

// The one generic launch behind all four ops: validate, then (unless found_inf skips the step)
// increment the steps and derive each tensor's scalars, then run the kernels over the chunk table.
template <class Kernel, class MakeHyper, class ScalarsOf>
void fused_step(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states,
                const MakeHyper& make_hyper, const ScalarsOf& scalars_of) {
  validate(op, a, states);
  const double lr = read_lr(a.lr);
  const typename Kernel::Hyper hyper = make_hyper(lr);
  const bool skip = a.found_inf && *a.found_inf->const_data_ptr<float>() != 0;
  const auto boundary = static_cast<Boundary>(a.boundary);
  if (skip && boundary == Boundary::kNone) return;

  const size_t n = a.params.size();
  std::vector<cpu::TensorPtrs> tensors(n);
  std::vector<typename Kernel::Scalars> scalars(n);
  std::vector<int64_t> numels(n);
  int64_t numel = 0;
  for (size_t i = 0; i < n; ++i) {
    cpu::TensorPtrs& t = tensors[i];
    t = {a.params[i].data_ptr(),     a.grads[i].const_data_ptr(),
         a.gains[i].data_ptr<float>(), a.grad_sums[i].data_ptr<float>(),
         a.prev_signs[i].data_ptr<int8_t>(), {}};
    for (size_t k = 0; k < states.size(); ++k) t.state[k] = states[k].tensors[i].data_ptr();
    if (!skip) {
      float& step = *a.steps[i].data_ptr<float>();
      step += 1;  // float32, like the reference's steps[i].add_(1)
      scalars[i] = scalars_of(hyper, static_cast<double>(step));
    }
    numels[i] = a.params[i].numel();
    numel += numels[i];
  }
  const std::vector<Chunk> chunks =
      make_chunks(numels.data(), static_cast<int32_t>(n), cpu::kChunkSize);

  const double scale = a.grad_scale ? *a.grad_scale->const_data_ptr<float>() : 1.0;
  const CommonHyper common{static_cast<float>(a.gain_inc),
                           static_cast<float>(a.gain_dec),
                           static_cast<float>(a.min_gain),
                           static_cast<float>(a.max_gain),
                           1 - lr * a.weight_decay,
                           a.maximize ? -scale : scale,  // g / -s == -(g / s) exactly
                           a.grad_scale.has_value() || a.maximize};
  cpu::step(cpu::Bucket<Kernel>{kernel_dtype(a.params[0].scalar_type()), boundary, skip, common,
                                hyper, tensors.data(), scalars.data(), chunks.data(),
                                static_cast<int64_t>(chunks.size()), numel});
}

// Appends the amsgrad list when it is on; when it is off the list must be empty.
void add_amsgrad_list(const char* op, std::vector<NamedList>& states, bool amsgrad,
                      NamedList list) {
  if (amsgrad) {
    states.push_back(list);
  } else {
    TORCH_CHECK(list.tensors.empty(), op, ": ", list.name, " must be empty when amsgrad is off");
  }
}

#define ACTIVE_ARGS                                                                             \
  TensorList params, TensorList grads, TensorList gains, TensorList grad_sums,                 \
      TensorList prev_signs, TensorList steps
#define ACTIVE_TAIL_ARGS                                                                        \
  double weight_decay, bool maximize, double gain_inc, double gain_dec, double min_gain,       \
      double max_gain, int64_t boundary, const OptionalTensor &grad_scale,                      \
      const OptionalTensor &found_inf
#define ACTIVE_ARGS_STRUCT                                                                      \
  ActiveArgs {                                                                                  \
    params, grads, gains, grad_sums, prev_signs, steps, lr, weight_decay, maximize, gain_inc,   \
        gain_dec, min_gain, max_gain, boundary, grad_scale, found_inf                           \
  }

void active_sgd_(ACTIVE_ARGS, TensorList momentum_buffers, const Tensor& lr, double momentum,
                 double dampening, bool nesterov, ACTIVE_TAIL_ARGS) {
  fused_step<Sgd>(
      "active_sgd_", ACTIVE_ARGS_STRUCT, {{"momentum_buffers", momentum_buffers}},
      [&](double lr_value) { return Sgd::Hyper{lr_value, momentum, dampening, nesterov}; },
      [](const Sgd::Hyper&, double step) { return sgd_scalars(step); });
}

void active_adamw_(ACTIVE_ARGS, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, const Tensor& lr, double beta1, double beta2,
                   double eps, bool amsgrad, ACTIVE_TAIL_ARGS) {
  const char* op = "active_adamw_";
  std::vector<NamedList> states = {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  add_amsgrad_list(op, states, amsgrad, {"max_exp_avg_sqs", max_exp_avg_sqs});
  fused_step<AdamW>(
      op, ACTIVE_ARGS_STRUCT, states,
      [&](double lr_value) { return AdamW::Hyper{lr_value, beta1, beta2, eps, amsgrad, false}; },
      adamw_scalars);
}

void active_radam_(ACTIVE_ARGS, TensorList exp_avgs, TensorList exp_avg_sqs, const Tensor& lr,
                   double beta1, double beta2, double eps, ACTIVE_TAIL_ARGS) {
  fused_step<RAdam>(
      "active_radam_", ACTIVE_ARGS_STRUCT, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
      [&](double lr_value) { return RAdam::Hyper{lr_value, beta1, beta2, eps, false, false}; },
      radam_scalars);
}

void active_adabelief_(ACTIVE_ARGS, TensorList exp_avgs, TensorList exp_avg_vars,
                       TensorList max_exp_avg_vars, const Tensor& lr, double beta1,
                       double beta2, double eps, bool amsgrad, bool rectify, ACTIVE_TAIL_ARGS) {
  const char* op = "active_adabelief_";
  std::vector<NamedList> states = {{"exp_avgs", exp_avgs}, {"exp_avg_vars", exp_avg_vars}};
  add_amsgrad_list(op, states, amsgrad, {"max_exp_avg_vars", max_exp_avg_vars});
  fused_step<AdaBelief>(
      op, ACTIVE_ARGS_STRUCT, states,
      [&](double lr_value) {
        return AdaBelief::Hyper{lr_value, beta1, beta2, eps, amsgrad, rectify};
      },
      adabelief_scalars);
}

// A no-op with the signature of F: the Meta (and so fake-tensor) kernel of a mutating op.
template <class F>
struct NoOp;
template <class... Args>
struct NoOp<void(Args...)> {
  static void fn(Args...) {}
};

}  // namespace

#define ACTIVE_SCHEMA_HEAD                                                                     \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] gains, Tensor(c!)[] grad_sums, "          \
  "Tensor(d!)[] prev_signs, Tensor(e!)[] steps, "
#define ACTIVE_SCHEMA_TAIL                                                                     \
  "float weight_decay, bool maximize, float gain_inc, float gain_dec, float min_gain, "          \
  "float max_gain, int boundary, Tensor? grad_scale, Tensor? found_inf) -> ()"

TORCH_LIBRARY(adaptive_lr, m) {
  m.def("active_sgd_" ACTIVE_SCHEMA_HEAD
        "Tensor(f!)[] momentum_buffers, Tensor lr, float momentum, float dampening, bool nesterov, "
        ACTIVE_SCHEMA_TAIL);
  m.def("active_adamw_" ACTIVE_SCHEMA_HEAD
        "Tensor(f!)[] exp_avgs, Tensor(g!)[] exp_avg_sqs, Tensor(h!)[] max_exp_avg_sqs, "
        "Tensor lr, float beta1, float beta2, float eps, bool amsgrad, " ACTIVE_SCHEMA_TAIL);
  m.def("active_radam_" ACTIVE_SCHEMA_HEAD
        "Tensor(f!)[] exp_avgs, Tensor(g!)[] exp_avg_sqs, "
        "Tensor lr, float beta1, float beta2, float eps, " ACTIVE_SCHEMA_TAIL);
  m.def("active_adabelief_" ACTIVE_SCHEMA_HEAD
        "Tensor(f!)[] exp_avgs, Tensor(g!)[] exp_avg_vars, Tensor(h!)[] max_exp_avg_vars, "
        "Tensor lr, float beta1, float beta2, float eps, bool amsgrad, bool rectify, "
        ACTIVE_SCHEMA_TAIL);
}

TORCH_LIBRARY_IMPL(adaptive_lr, CPU, m) {
  m.impl("active_sgd_", &active_sgd_);
  m.impl("active_adamw_", &active_adamw_);
  m.impl("active_radam_", &active_radam_);
  m.impl("active_adabelief_", &active_adabelief_);
}

TORCH_LIBRARY_IMPL(adaptive_lr, Meta, m) {
  m.impl("active_sgd_", &NoOp<decltype(active_sgd_)>::fn);
  m.impl("active_adamw_", &NoOp<decltype(active_adamw_)>::fn);
  m.impl("active_radam_", &NoOp<decltype(active_radam_)>::fn);
  m.impl("active_adabelief_", &NoOp<decltype(active_adabelief_)>::fn);
}

}  // namespace adaptive_lr

// `import adaptive_lr._C` loads this library, whose static initializers register the ops above.
extern "C" PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "adaptive_lr's fused kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
