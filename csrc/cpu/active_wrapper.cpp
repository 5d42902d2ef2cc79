// torch.ops.adaptive_lr.active_rescale_: Active(optimizer)'s one pass over memory after its inner
// optimizer stepped (adaptive_lr/optim/wrapper.py): per element, the epoch boundary, the inner
// step scaled by the gain, and the gradient into the epoch sum (scale_inner_step in math.h), and
// its square into the epoch sum of g^2 where the wrapper keeps one for the sign test.
//
// setup.py compiles this file once per CPU capability, like fused_step_kernel.cpp: the element
// loop below is plain C++ that the compiler vectorizes for each capability's ISA flags. The
// DEFAULT build also holds the op (validation, chunk table, OpenMP launch) and registers it.
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "adaptive_lr/chunks.h"
#include "adaptive_lr/math.h"
#include "cpu/fused_step.h"

#ifndef CPU_CAPABILITY
#error "compile active_wrapper.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

// Heavy headers only in the DEFAULT build: an inline function they define, compiled with AVX-512
// flags, could be the copy the linker keeps for the whole library.
#if defined(CPU_CAPABILITY_DEFAULT) || defined(ADAPTIVE_LR_ONE_CAPABILITY)
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "active_args.h"
#endif

namespace adaptive_lr::cpu::rescale {

// One param's arrays, all contiguous with its number of elements.
struct Ptrs {
  void* param;          // the param's dtype: the inner optimizer's result, scaled in place
  const void* before;   // the param's dtype: its value before the inner step
  const void* grad;     // the param's dtype
  float* gain;
  float* grad_sum;
  int8_t* prev_sign;
  float* grad_sq_sum;    // the wrapper's epoch sum of g^2, or null (not kept)
  const float* moment;   // the inner optimizer's second moment, or null (not read)
};

struct Pass {
  at::ScalarType dtype;
  Boundary boundary;
  CommonHyper common;
  bool keeps_squares;               // grad_sq_sum accumulates (and is the sign test's noise)
  const double* sign_test_factors;  // per tensor, at a boundary with the sign test
  const Ptrs* tensors;
  const Chunk* chunks;
};

#define ADAPTIVE_LR_DECLARE_RESCALE(CAPABILITY) \
  namespace CAPABILITY {                        \
  void run_chunks(const Pass& pass, int64_t begin, int64_t end); \
  }
ADAPTIVE_LR_DECLARE_RESCALE(DEFAULT)
ADAPTIVE_LR_DECLARE_RESCALE(AVX2)
ADAPTIVE_LR_DECLARE_RESCALE(AVX512)
#undef ADAPTIVE_LR_DECLARE_RESCALE

namespace CPU_CAPABILITY {
namespace {

template <Boundary B, bool kSquares, class P>
void rescale_chunk(const Pass& pass, const Chunk& chunk) {
  using C = std::conditional_t<std::is_same_v<P, double>, double, float>;  // compute type
  const Ptrs& t = pass.tensors[chunk.tensor];
  P* __restrict__ const param = static_cast<P*>(t.param) + chunk.offset;
  const P* __restrict__ const before = static_cast<const P*>(t.before) + chunk.offset;
  const P* __restrict__ const grad = static_cast<const P*>(t.grad) + chunk.offset;
  float* __restrict__ const gain = t.gain + chunk.offset;
  float* __restrict__ const grad_sum = t.grad_sum + chunk.offset;
  int8_t* __restrict__ const prev_sign = t.prev_sign + chunk.offset;
  float* __restrict__ const grad_sq_sum = kSquares ? t.grad_sq_sum + chunk.offset : nullptr;
  const bool test = B != Boundary::kNone && pass.common.sign_test;
  const float* __restrict__ const moment = test && !kSquares ? t.moment + chunk.offset : nullptr;
  const CommonLanes<C> common(pass.common, test ? pass.sign_test_factors[chunk.tensor] : 0.0);
  // The arrays are distinct tensors (a fresh snapshot, the param, its grad, Active's state; the
  // restrict qualifiers above say so, but GCC checks aliasing at run time instead): ivdep spares
  // those checks, whose count with grad_sq_sum (12) passed GCC's limit (10) and kept the
  // float32 loop scalar.
#pragma GCC ivdep
  for (int64_t i = 0; i < chunk.length; ++i) {
    C theta = static_cast<C>(param[i]), gamma = gain[i], g_sum = grad_sum[i], sign = 0, noise = 0;
    if constexpr (B != Boundary::kNone) {
      sign = prev_sign[i];
      if (test) noise = kSquares ? grad_sq_sum[i] : moment[i];
    }
    scale_inner_step<B>(common, theta, static_cast<C>(before[i]), static_cast<C>(grad[i]), gamma,
                        g_sum, sign, noise);
    if constexpr (B == Boundary::kUpdate) gain[i] = static_cast<float>(gamma);
    if constexpr (B != Boundary::kNone) prev_sign[i] = static_cast<int8_t>(sign);
    grad_sum[i] = static_cast<float>(g_sum);
    param[i] = static_cast<P>(theta);
    if constexpr (kSquares) {
      // in float32 whatever the param's dtype (the reference's float32 ops): g rounded to
      // float32, its square and the sum each rounded once; reset at the boundary, as grad_sum
      const float g = static_cast<float>(grad[i]);
      grad_sq_sum[i] = (B == Boundary::kNone ? grad_sq_sum[i] : 0.0f) + g * g;
    }
  }
}

template <Boundary B, bool kSquares>
void run(const Pass& pass, int64_t begin, int64_t end) {
  const auto each = [&](auto chunk_fn) {
    for (int64_t c = begin; c < end; ++c) chunk_fn(pass, pass.chunks[c]);
  };
  switch (pass.dtype) {
    case at::kDouble: return each(rescale_chunk<B, kSquares, double>);
    case at::kBFloat16: return each(rescale_chunk<B, kSquares, c10::BFloat16>);
    case at::kHalf: return each(rescale_chunk<B, kSquares, c10::Half>);
    default: return each(rescale_chunk<B, kSquares, float>);  // validated: the only other dtype
  }
}

template <Boundary B>
void run(const Pass& pass, int64_t begin, int64_t end) {
  if (pass.keeps_squares) return run<B, true>(pass, begin, end);
  run<B, false>(pass, begin, end);
}

}  // namespace

void run_chunks(const Pass& pass, int64_t begin, int64_t end) {
  switch (pass.boundary) {
    case Boundary::kNone: return run<Boundary::kNone>(pass, begin, end);
    case Boundary::kRoll: return run<Boundary::kRoll>(pass, begin, end);
    case Boundary::kUpdate: return run<Boundary::kUpdate>(pass, begin, end);
  }
}

}  // namespace CPU_CAPABILITY

// the op, once (the just-in-time build compiles this file for one capability only)
#if defined(CPU_CAPABILITY_DEFAULT) || defined(ADAPTIVE_LR_ONE_CAPABILITY)
namespace {

using at::Tensor;
using at::TensorList;
using RunChunks = void (*)(const Pass&, int64_t, int64_t);

RunChunks pick_capability() {
#if defined(ADAPTIVE_LR_ONE_CAPABILITY)
  return &CPU_CAPABILITY::run_chunks;
#else
#if defined(ADAPTIVE_LR_CPU_X86)
  const std::string capability = cpu::kernel_capability();
  if (capability == "AVX512") return &AVX512::run_chunks;
  if (capability == "AVX2") return &AVX2::run_chunks;
#endif
  return &DEFAULT::run_chunks;
#endif
}

// Everything is checked before anything is written, so a failing call changes nothing.
void validate(const char* op, TensorList params, TensorList befores, TensorList grads,
              TensorList gains, TensorList grad_sums, TensorList prev_signs,
              TensorList grad_sq_sums, TensorList moments, at::ArrayRef<double> sign_test_factors,
              double sign_threshold, bool relax_gains, int64_t boundary) {
  TORCH_CHECK(boundary >= 0 && boundary <= 2, op,
              ": boundary must be 0 (none), 1 (roll) or 2 (update), got ", boundary);
  TORCH_CHECK(std::isfinite(sign_threshold) && sign_threshold >= 0, op,
              ": sign_threshold must be finite and >= 0, got ", sign_threshold);
  TORCH_CHECK(!relax_gains || sign_threshold > 0, op,
              ": relax_gains needs the sign test (sign_threshold > 0)");
  const size_t n = params.size();
  TORCH_CHECK(n > 0 && params[0].defined(), op, ": params is empty");
  const std::vector<NamedList> lists = {{"befores", befores}, {"grads", grads}, {"gains", gains},
                                        {"grad_sums", grad_sums}, {"prev_signs", prev_signs}};
  for (const NamedList& l : lists) {
    TORCH_CHECK(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                " tensors but params has ", n);
  }
  // the sign test's noise: the wrapper's own epoch sums of g^2, or the inner optimizer's moments
  // (read at a boundary only), never both
  for (const NamedList& l : {NamedList{"grad_sq_sums", grad_sq_sums}, {"moments", moments}}) {
    TORCH_CHECK(l.tensors.empty() || l.tensors.size() == n, op, ": ", l.name, " has ",
                l.tensors.size(), " tensors but params has ", n, " (or none)");
  }
  TORCH_CHECK(grad_sq_sums.empty() || moments.empty(), op,
              ": give grad_sq_sums or moments, not both");
  if (sign_threshold > 0 && boundary != 0) {
    TORCH_CHECK(!grad_sq_sums.empty() || !moments.empty(), op,
                ": the sign test at a boundary needs grad_sq_sums or moments");
    TORCH_CHECK(sign_test_factors.size() == n, op, ": sign_test_factors has ",
                sign_test_factors.size(), " values but params has ", n);
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu(), op, ": this implementation runs on CPU tensors, got ", device);
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": params must be float32, float64, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_tensor(op, "params", i, p, device, dtype, nullptr);
    check_tensor(op, "befores", i, befores[i], device, dtype, &p);
    check_tensor(op, "grads", i, grads[i], device, dtype, &p);
    check_tensor(op, "gains", i, gains[i], device, at::kFloat, &p);
    check_tensor(op, "grad_sums", i, grad_sums[i], device, at::kFloat, &p);
    check_tensor(op, "prev_signs", i, prev_signs[i], device, at::kChar, &p);
    if (!grad_sq_sums.empty()) {
      check_tensor(op, "grad_sq_sums", i, grad_sq_sums[i], device, at::kFloat, &p);
    }
    if (!moments.empty()) check_tensor(op, "moments", i, moments[i], device, at::kFloat, &p);
  }
}

void active_rescale_(TensorList params, TensorList befores, TensorList grads, TensorList gains,
                     TensorList grad_sums, TensorList prev_signs, TensorList grad_sq_sums,
                     TensorList moments, at::ArrayRef<double> sign_test_factors, double gain_inc,
                     double gain_dec, double min_gain, double max_gain, double sign_threshold,
                     bool relax_gains, bool maximize, int64_t boundary) {
  validate("active_rescale_", params, befores, grads, gains, grad_sums, prev_signs, grad_sq_sums,
           moments, sign_test_factors, sign_threshold, relax_gains, boundary);
  const size_t n = params.size();
  std::vector<Ptrs> tensors(n);
  std::vector<int64_t> numels(n);
  int64_t numel = 0;
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = {params[i].data_ptr(), befores[i].const_data_ptr(), grads[i].const_data_ptr(),
                  gains[i].data_ptr<float>(), grad_sums[i].data_ptr<float>(),
                  prev_signs[i].data_ptr<int8_t>(),
                  grad_sq_sums.empty() ? nullptr : grad_sq_sums[i].data_ptr<float>(),
                  moments.empty() ? nullptr : moments[i].const_data_ptr<float>()};
    numels[i] = params[i].numel();
    numel += numels[i];
  }
  const std::vector<Chunk> chunks =
      make_chunks(numels.data(), static_cast<int32_t>(n), kChunkSize);
  // no weight decay or lr here (decay 1): only the gain rule and maximize's sign are used; the
  // sign test's factors come per tensor (no epoch length here)
  const Pass pass{params[0].scalar_type(), static_cast<Boundary>(boundary),
                  common_hyper(gain_inc, gain_dec, min_gain, max_gain, sign_threshold,
                               relax_gains, 0, 0.0, maximize, 0.0, nullptr),
                  !grad_sq_sums.empty(), sign_test_factors.data(), tensors.data(), chunks.data()};
  static const RunChunks run_chunks = pick_capability();
  parallel_over_shares(chunks.data(), static_cast<int64_t>(chunks.size()), numel,
                       [&](int64_t begin, int64_t end) { run_chunks(pass, begin, end); });
}

void active_rescale_meta(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                         TensorList, TensorList, at::ArrayRef<double>, double, double, double,
                         double, double, bool, bool, int64_t) {}

}  // namespace

// A fragment: ops.cpp holds the library's TORCH_LIBRARY block.
TORCH_LIBRARY_FRAGMENT(adaptive_lr, m) {
  m.def("active_rescale_(Tensor(a!)[] params, Tensor[] befores, Tensor[] grads, "
        "Tensor(b!)[] gains, Tensor(c!)[] grad_sums, Tensor(d!)[] prev_signs, "
        "Tensor(e!)[] grad_sq_sums, Tensor[] moments, float[] sign_test_factors, float gain_inc, "
        "float gain_dec, float min_gain, float max_gain, float sign_threshold, bool relax_gains, "
        "bool maximize, "
        "int boundary) -> ()");
}

TORCH_LIBRARY_IMPL(adaptive_lr, CPU, m) { m.impl("active_rescale_", &active_rescale_); }

// mutates its inputs and returns nothing: all torch.compile needs of its fake kernel
TORCH_LIBRARY_IMPL(adaptive_lr, Meta, m) { m.impl("active_rescale_", &active_rescale_meta); }
#endif

}  // namespace adaptive_lr::cpu::rescale
