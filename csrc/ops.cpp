// torch.ops.adaptive_lr: one in-place op per Active optimizer, stepping a whole bucket (all
// tensors of one device and dtype) in one call. The CPU implementation validates every tensor
// before touching any (active_args.h), then runs the fused kernels of csrc/cpu; built against a
// CUDA torch, the same ops run the kernels of csrc/cuda on CUDA tensors (cuda/ops_cuda.cpp). The
// Meta implementations do nothing, which is all torch.compile needs of an op that mutates its
// inputs and returns nothing.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
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

cpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat;
    case at::kDouble: return cpu::DType::kDouble;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    default: return cpu::DType::kHalf;  // the only other dtype validate() lets through
  }
}

// The one generic launch behind all four ops: validate, then (unless found_inf skips the step)
// increment the steps and derive each tensor's scalars, then run the kernels over the chunk table.
template <class Kernel, class MakeHyper>
void fused_step(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states,
                const MakeHyper& make_hyper) {
#ifdef ADAPTIVE_LR_WITH_CUDA
  if (!a.params.empty() && a.params[0].is_cuda()) {
    return cuda::fused_step<Kernel>(op, a, states, make_hyper(0.0));  // the kernels read a.lr
  }
#endif
  validate(op, a, states, at::kCPU);
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
      scalars[i] = step_scalars(hyper, static_cast<double>(step));
    }
    numels[i] = a.params[i].numel();
    numel += numels[i];
  }
  const std::vector<Chunk> chunks =
      make_chunks(numels.data(), static_cast<int32_t>(n), cpu::kChunkSize);

  const CommonHyper common =
      common_hyper(a.gain_inc, a.gain_dec, a.min_gain, a.max_gain, a.weight_decay, a.maximize, lr,
                   a.grad_scale ? a.grad_scale->const_data_ptr<float>() : nullptr);
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
      [&](double lr_value) { return Sgd::Hyper{lr_value, momentum, dampening, nesterov}; });
}

void active_adamw_(ACTIVE_ARGS, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, const Tensor& lr, double beta1, double beta2,
                   double eps, bool amsgrad, ACTIVE_TAIL_ARGS) {
  const char* op = "active_adamw_";
  std::vector<NamedList> states = {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  add_amsgrad_list(op, states, amsgrad, {"max_exp_avg_sqs", max_exp_avg_sqs});
  fused_step<AdamW>(
      op, ACTIVE_ARGS_STRUCT, states,
      [&](double lr_value) { return AdamW::Hyper{lr_value, beta1, beta2, eps, amsgrad, false}; });
}

void active_radam_(ACTIVE_ARGS, TensorList exp_avgs, TensorList exp_avg_sqs, const Tensor& lr,
                   double beta1, double beta2, double eps, ACTIVE_TAIL_ARGS) {
  fused_step<RAdam>(
      "active_radam_", ACTIVE_ARGS_STRUCT, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
      [&](double lr_value) { return RAdam::Hyper{lr_value, beta1, beta2, eps, false, true}; });
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
      });
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

#ifdef ADAPTIVE_LR_WITH_CUDA
TORCH_LIBRARY_IMPL(adaptive_lr, CUDA, m) {
  m.impl("active_sgd_", &active_sgd_);
  m.impl("active_adamw_", &active_adamw_);
  m.impl("active_radam_", &active_radam_);
  m.impl("active_adabelief_", &active_adabelief_);
}
#endif

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
