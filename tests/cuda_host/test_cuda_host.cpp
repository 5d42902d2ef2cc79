// The CUDA kernels of csrc/cuda, unchanged, executed on the host (tests/cuda_host/include: the
// CUDA runtime emulated, every block of a launch in a shuffled order, every thread of a block a
// real thread) and compared bit for bit with a transcription of the CPU op's scalar path
// (csrc/ops.cpp's cpu_step and csrc/cpu/fused_step_kernel.cpp's step_chunk/boundary_chunk on
// scalar lanes: the same math.h functions, with the CPU op's step counters, sign-test factors and
// rounding keys). Built with -ffp-contract=off (as the CPU kernels; the CUDA build has
// --fmad=false) and with AddressSanitizer and UBSan, so an out-of-bounds or misaligned access in a
// kernel fails the test. What this proves and what it cannot: docs/cuda.md, "Host emulation".
// The kernels themselves are instantiated in step_kernels_host.cpp (csrc/cuda/step_kernels.cu,
// compiled as C++), here only declared (fused_step.h's extern templates).
#include "active_step.cuh"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"

using namespace adaptive_lr;
namespace acu = adaptive_lr::cuda;

namespace {

// ---- reference conversions (independent of the emulation's cuda_bf16.h / cuda_fp16.h) ---------

uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}
_Float16 half_of(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, sizeof h);
  return h;
}

// param element -> compute lane (the CPU path's c10::BFloat16 / c10::Half -> float)
template <class C, class P>
C ref_load(P x) {
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    return bfloat16_value(x.__x);
  } else if constexpr (std::is_same_v<P, __half>) {
    return static_cast<float>(half_of(x.__x));
  } else {
    return static_cast<C>(x);
  }
}

// compute lane -> param element, rounded to nearest even (c10's conversions)
template <class P, class C>
P ref_store(C x) {
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    return {bfloat16_nearest(static_cast<float>(x))};
  } else if constexpr (std::is_same_v<P, __half>) {
    return {half_bits(static_cast<_Float16>(static_cast<float>(x)))};
  } else {
    return static_cast<P>(x);
  }
}

// The emulation's half/bfloat16 conversions against the compiler's _Float16 and math.h.
void test_conversions() {
  int bad = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {  // every half: to float and back
    const __half h{static_cast<unsigned short>(b)};
    const float f = __half2float(h);
    const float expected = static_cast<float>(half_of(static_cast<uint16_t>(b)));
    if (f != f) {
      bad += expected == expected;
      continue;
    }
    bad += std::memcmp(&f, &expected, sizeof f) != 0;
    bad += __float2half_rn(f).__x != b;
  }
  CHECK(bad == 0);
  // floats near every half (halfway points, their neighbours) and a sweep of the float range
  uint32_t failures = 0;
  const auto check_float = [&](float f) {
    if (f != f) return;
    const uint16_t expected = half_bits(static_cast<_Float16>(f));
    const uint16_t got = __float2half_rn(f).__x;
    if (got != expected && failures++ < 5) {
      std::printf("__float2half_rn(%a) = 0x%04x, _Float16 gives 0x%04x\n", f, got, expected);
    }
    const uint16_t bf_expected = bfloat16_nearest(f);
    const uint16_t bf_got = __float2bfloat16_rn(f).__x;
    if (bf_got != bf_expected && failures++ < 5) {
      std::printf("__float2bfloat16_rn(%a) = 0x%04x, expected 0x%04x\n", f, bf_got, bf_expected);
    }
  };
  for (uint32_t b = 0; b < 0x7c00; ++b) {
    const float lo = static_cast<float>(half_of(static_cast<uint16_t>(b)));
    const float hi = static_cast<float>(half_of(static_cast<uint16_t>(b + 1)));
    const float mid = lo + (hi - lo) / 2;  // exact: the halfway point is a float
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      check_float(f);
      check_float(-f);
    }
  }
  for (uint64_t u = 0; u < 0x100000000ULL; u += 0x1003) {
    float f;
    const uint32_t bits = static_cast<uint32_t>(u);
    std::memcpy(&f, &bits, sizeof f);
    check_float(f);
  }
  CHECK(failures == 0);
  CHECK(__bfloat162float(__float2bfloat16_rn(1.0f)) == 1.0f);
}

// ---- one bucket's arrays ----------------------------------------------------------------------

template <class X>
struct Array {  // `n` elements at `data`, `skew` bytes past an allocation of exactly that size
  std::unique_ptr<unsigned char[]> storage;
  X* data = nullptr;
  void allocate(int64_t n, int skew) {
    if (n == 0) return;  // an empty tensor's data pointer may be null
    storage.reset(new unsigned char[static_cast<size_t>(n) * sizeof(X) + skew]);
    data = reinterpret_cast<X*>(storage.get() + skew);
  }
};

enum class Misalign { kNone, kAll, kPrevSign };

template <class Kernel, class P, StatePrecision S>
struct Tensors {
  using C = std::conditional_t<std::is_same_v<P, double>, double, float>;
  using G = acu::SignState<S>;
  using M = acu::MomentState<S, C>;
  static constexpr int N = Kernel::kMaxStates;
  int64_t n;
  Array<P> param;
  Array<G> gain, grad_sum, grad_sq_sum;  // grad_sq_sum: a kernel without a second moment's
  Array<int8_t> prev_sign;
  Array<float> step;
  Array<M> state[N];

  Tensors(int64_t numel, Misalign m, int num_states, uint32_t seed) : n(numel) {
    const int e = m == Misalign::kAll ? 1 : 0;
    param.allocate(n, e * sizeof(P));
    gain.allocate(n, e * sizeof(G));
    grad_sum.allocate(n, e * sizeof(G));
    if (kKeepsGradSqSum<Kernel>) grad_sq_sum.allocate(n, e * sizeof(G));
    prev_sign.allocate(n, m == Misalign::kNone ? 0 : 1);
    step.allocate(1, 0);
    for (int k = 0; k < num_states; ++k) state[k].allocate(n, e * sizeof(M));
    *step.data = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(mix32(seed + static_cast<uint32_t>(i))) * 0x1p-31f - 1;
      param.data[i] = ref_store<P>(static_cast<C>(x));
      gain.data[i] = compact_sign_state(S) ? G(0x3f80) : G(1);  // 1.0
      grad_sum.data[i] = G(0);
      if (kKeepsGradSqSum<Kernel>) grad_sq_sum.data[i] = G(0);
      prev_sign.data[i] = 0;
      for (int k = 0; k < num_states; ++k) state[k].data[i] = M(0);
    }
  }
};

// The CPU op's step on scalar lanes (csrc/ops.cpp cpu_step; fused_step_kernel.cpp step_chunk and
// boundary_chunk with T = C).
template <Boundary B, class Kernel, class P, StatePrecision S>
void reference_step(std::vector<Tensors<Kernel, P, S>>& ts, const std::vector<Array<P>>& grads,
                    const std::vector<uint32_t>& seeds, typename Kernel::Hyper hyper,
                    const acu::StepArgs<Kernel>& a) {
  using T = Tensors<Kernel, P, S>;
  using C = typename T::C;
  const double lr = a.lr_is_double ? *static_cast<const double*>(a.lr)
                                   : *static_cast<const float*>(a.lr);
  hyper.lr = lr;
  const bool skip = a.found_inf && *a.found_inf != 0;
  if (skip && B == Boundary::kNone) return;
  const CommonHyper common =
      common_hyper(a.gain_inc, a.gain_dec, a.min_gain, a.max_gain, a.sign_threshold,
                   a.relax_gains, a.epoch_steps, a.weight_decay, a.maximize, lr, a.grad_scale);
  const int num_states = hyper.num_states();
  const bool keeps_grad_sq_sum = kKeepsGradSqSum<Kernel> && common.sign_test;
  for (size_t t = 0; t < ts.size(); ++t) {
    T& x = ts[t];
    float& step = *x.step.data;
    const double factor = sign_test_factor<Kernel>(common, hyper, static_cast<double>(step));
    const float next_step = step + 1;
    const uint32_t key = compact_sign_state(S)
                             ? rounding_key(seeds[t], static_cast<uint32_t>(next_step))
                             : 0;
    typename Kernel::Scalars scalars{};
    if (!skip) {
      step = next_step;
      scalars = Kernel::step_scalars(hyper, static_cast<double>(step));
    }
    const CommonLanes<C> lanes(common, factor);
    const Update<Kernel, C> update(hyper, scalars);
    // a bfloat16 gain, sum or moment (its bits), or a float one
    const auto load_g = [](auto g) -> C {
      if constexpr (std::is_same_v<decltype(g), uint16_t>) {
        return bfloat16_value(g);
      } else {
        return g;
      }
    };
    const auto store_g_nearest = [](C v) -> typename T::G {
      if constexpr (compact_sign_state(S)) {
        return bfloat16_nearest(static_cast<float>(v));
      } else {
        return static_cast<float>(v);
      }
    };
    for (int64_t i = 0; i < x.n; ++i) {
      const uint32_t index = static_cast<uint32_t>(i);
      C gamma = load_g(x.gain.data[i]), g_sum = load_g(x.grad_sum.data[i]);
      C sq_sum = keeps_grad_sq_sum ? load_g(x.grad_sq_sum.data[i]) : C(0);
      C sign = x.prev_sign.data[i];
      if (skip) {
        C noise = sq_sum;
        if constexpr (Kernel::kSecondMoment >= 0) {
          if (common.sign_test) noise = load_g(x.state[Kernel::kSecondMoment].data[i]);
        }
        apply_boundary<B, S>(lanes, gamma, g_sum, sign, noise, key, index);
        if constexpr (B == Boundary::kUpdate) x.gain.data[i] = store_g_nearest(gamma);
        x.prev_sign.data[i] = static_cast<int8_t>(sign);
        x.grad_sum.data[i] = store_g_nearest(g_sum);
        if (keeps_grad_sq_sum) x.grad_sq_sum.data[i] = store_g_nearest(0);
        continue;
      }
      if constexpr (B == Boundary::kNone) sign = 0;
      C theta = ref_load<C>(x.param.data[i]);
      C st[T::N]{};
      for (int k = 0; k < T::N; ++k) {
        if (k < num_states) st[k] = load_g(x.state[k].data[i]);
      }
      fused_step<B, S>(lanes, update, theta, ref_load<C>(grads[t].data[i]), gamma, g_sum,
                       sq_sum, sign, st, key, index);
      if constexpr (B == Boundary::kUpdate) x.gain.data[i] = store_g_nearest(gamma);
      if constexpr (B != Boundary::kNone) x.prev_sign.data[i] = static_cast<int8_t>(sign);
      if constexpr (compact_sign_state(S)) {
        x.grad_sum.data[i] = bfloat16_stochastic(static_cast<float>(g_sum), key, index);
        if (keeps_grad_sq_sum) {
          x.grad_sq_sum.data[i] =
              bfloat16_stochastic_low_bits(static_cast<float>(sq_sum), key, index);
        }
      } else {
        x.grad_sum.data[i] = static_cast<float>(g_sum);
        if (keeps_grad_sq_sum) x.grad_sq_sum.data[i] = static_cast<float>(sq_sum);
      }
      x.param.data[i] = ref_store<P>(theta);
      for (int k = 0; k < T::N; ++k) {
        if (k >= num_states) continue;
        if constexpr (S == StatePrecision::kBfloat16) {
          x.state[k].data[i] = bfloat16_stochastic(static_cast<float>(st[k]), moment_key(key, k),
                                                   index);
        } else {
          x.state[k].data[i] = st[k];
        }
      }
    }
  }
}

template <class X>
bool same(const Array<X>& got, const Array<X>& expected, int64_t n, const std::string& what) {
  if (n == 0) return true;
  const auto* a = reinterpret_cast<const unsigned char*>(got.data);
  const auto* b = reinterpret_cast<const unsigned char*>(expected.data);
  if (std::memcmp(a, b, static_cast<size_t>(n) * sizeof(X)) == 0) return true;
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i * sizeof(X), b + i * sizeof(X), sizeof(X)) != 0) {
      uint64_t x = 0, y = 0;
      std::memcpy(&x, a + i * sizeof(X), sizeof(X));
      std::memcpy(&y, b + i * sizeof(X), sizeof(X));
      std::printf("  %s[%lld]: kernel 0x%llx, reference 0x%llx\n", what.c_str(),
                  static_cast<long long>(i), static_cast<unsigned long long>(x),
                  static_cast<unsigned long long>(y));
      break;
    }
  }
  return false;
}

// A bucket's tensors: element count and misalignment.
struct Shape {
  int64_t numel;
  Misalign misalign;
};

// A config: one kernel, param dtype and state precision, and the step arguments' variants.
struct Variant {
  bool lr_is_double, grad_scale, maximize, found_inf, sign_test, relax_gains, flags;
  double weight_decay;
};

const char* kBoundaryNames[] = {"none", "roll", "update"};
const char* kPrecisionNames[] = {"full", "compact", "bfloat16"};

template <class Kernel>
std::vector<double> hyper_values(bool flags) {
  const double f = flags ? 1 : 0;
  if constexpr (std::is_same_v<Kernel, Sgd>) return {0.9, 0.1, f};  // momentum dampening nesterov
  if constexpr (std::is_same_v<Kernel, AdamW>) return {0.9, 0.999, 1e-8, f};
  if constexpr (std::is_same_v<Kernel, RAdam>) return {0.9, 0.999, 1e-8};
  if constexpr (std::is_same_v<Kernel, AdaBelief>) return {0.9, 0.999, 1e-8, f, f};
  if constexpr (std::is_same_v<Kernel, Adam>) return {0.9, 0.999, 1e-8, f, 0.01};
  if constexpr (std::is_same_v<Kernel, Lion>) return {0.9, 0.99};
  return {};
}

int64_t g_configs = 0, g_steps = 0;

// `schedule`: the boundary kind of each step; `inf_steps`: steps whose found_inf is set (when
// the variant has a found_inf tensor). Returns false on the first mismatch.
template <class Kernel, class P, StatePrecision S>
bool run_config(const char* name, const char* dtype, const std::vector<Shape>& shapes,
                const Variant& v, const std::vector<Boundary>& schedule,
                const std::vector<int>& inf_steps, uint32_t config_seed) {
  using T = Tensors<Kernel, P, S>;
  using C = typename T::C;
  const std::vector<double> values = hyper_values<Kernel>(v.flags);
  CHECK(values.size() == std::size(Kernel::kHyper));
  const typename Kernel::Hyper hyper = Kernel::make_hyper(0, values.data());
  const int num_states = hyper.num_states();
  const size_t n = shapes.size();
  std::vector<T> dev, ref;
  std::vector<uint32_t> seeds(n);
  std::vector<int64_t> numels(n);
  dev.reserve(n);
  ref.reserve(n);
  for (size_t t = 0; t < n; ++t) {
    const uint32_t seed = config_seed * 7919U + static_cast<uint32_t>(t) * 104729U;
    dev.emplace_back(shapes[t].numel, shapes[t].misalign, num_states, seed);
    ref.emplace_back(shapes[t].numel, Misalign::kNone, num_states, seed);
    seeds[t] = mix32(seed) | 1U;
    numels[t] = shapes[t].numel;
  }
  std::vector<Array<P>> grads(n);
  std::vector<acu::TensorAddresses<Kernel>> addresses(n);
  for (size_t t = 0; t < n; ++t) {
    grads[t].allocate(numels[t], shapes[t].misalign == Misalign::kAll ? sizeof(P) : 0);
    acu::TensorAddresses<Kernel>& a = addresses[t];
    a = {};
    a[acu::kParam] = dev[t].param.data;
    a[acu::kGrad] = grads[t].data;
    a[acu::kGain] = dev[t].gain.data;
    a[acu::kGradSum] = dev[t].grad_sum.data;
    a[acu::kPrevSign] = dev[t].prev_sign.data;
    a[acu::kStep] = dev[t].step.data;
    for (int k = 0; k < num_states; ++k) a[acu::kState0 + k] = dev[t].state[k].data;
    if constexpr (kKeepsGradSqSum<Kernel>) {
      if (v.sign_test) a[acu::kGradSqSum<Kernel>] = dev[t].grad_sq_sum.data;
    }
  }
  std::vector<int32_t> arrivals(acu::kMaxTensorSlots, 0);
  const float lr_f = 0.01f, grad_scale = 8.0f;
  const double lr_d = 0.01;
  float found_inf = 0;
  const acu::StepArgs<Kernel> args{hyper,
                                   0.25,  // gain_inc: small, so compact gains round stochastically
                                   0.9,
                                   0.1,
                                   8.0,
                                   v.sign_test ? 0.5 : 0.0,
                                   v.relax_gains,
                                   3,
                                   v.weight_decay,
                                   v.maximize,
                                   v.lr_is_double,
                                   v.lr_is_double ? static_cast<const void*>(&lr_d) : &lr_f,
                                   v.grad_scale ? &grad_scale : nullptr,
                                   v.found_inf ? &found_inf : nullptr,
                                   arrivals.data()};
  char label[256];
  std::snprintf(label, sizeof label,
                "%s %s %s (lr %s, grad_scale %d, maximize %d, found_inf %d, sign_test %d, "
                "relax_gains %d, flags %d, weight_decay %g, %zu tensors)",
                name, dtype, kPrecisionNames[static_cast<int>(S)],
                v.lr_is_double ? "double" : "float", v.grad_scale, v.maximize, v.found_inf,
                v.sign_test, v.relax_gains, v.flags, v.weight_decay, n);
  ++g_configs;
  for (size_t s = 0; s < schedule.size(); ++s) {
    // this step's gradients: a per-element constant sign plus noise, so epochs agree or flip
    for (size_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < numels[t]; ++i) {
        const uint32_t h = seeds[t] + static_cast<uint32_t>(i);
        const float base = (mix32(h) & 1U) ? 0.5f : -0.5f;
        const float noise = static_cast<float>(mix32(h ^ mix32(static_cast<uint32_t>(s) + 1))) *
                                0x1p-32f - 0.5f;
        float g = (base * 0.6f + noise) * (v.grad_scale ? grad_scale : 1.0f);
        if ((mix32(h + 17U * static_cast<uint32_t>(s)) & 63U) == 0) g = 0;  // exact zeros
        grads[t].data[i] = ref_store<P>(static_cast<C>(g));
      }
    }
    bool inf = false;
    for (int k : inf_steps) inf = inf || k == static_cast<int>(s);
    found_inf = v.found_inf && inf ? 1.0f : 0.0f;
    const Boundary b = schedule[s];
    const acu::Bucket<Kernel> bucket{
        std::is_same_v<P, float>    ? DType::kFloat
        : std::is_same_v<P, double> ? DType::kDouble
        : std::is_same_v<P, __half> ? DType::kHalf
                                    : DType::kBFloat16,
        b,
        S,
        args,
        addresses.data(),
        numels.data(),
        seeds.data(),
        static_cast<int32_t>(n)};
    const cudaError_t error = acu::step<Kernel>(bucket, nullptr);
    CHECK(error == cudaSuccess);
    switch (b) {
      case Boundary::kNone: reference_step<Boundary::kNone>(ref, grads, seeds, hyper, args); break;
      case Boundary::kRoll: reference_step<Boundary::kRoll>(ref, grads, seeds, hyper, args); break;
      case Boundary::kUpdate:
        reference_step<Boundary::kUpdate>(ref, grads, seeds, hyper, args);
        break;
    }
    ++g_steps;
    bool ok = true;
    for (int32_t c : arrivals) ok = ok && c == 0;
    if (!ok) std::printf("  arrival counters not reset to 0\n");
    for (size_t t = 0; t < n; ++t) {
      const int64_t m = numels[t];
      const std::string at = "tensor " + std::to_string(t) + " ";
      ok = same(dev[t].param, ref[t].param, m, at + "param") && ok;
      ok = same(dev[t].gain, ref[t].gain, m, at + "gain") && ok;
      ok = same(dev[t].grad_sum, ref[t].grad_sum, m, at + "grad_sum") && ok;
      ok = same(dev[t].prev_sign, ref[t].prev_sign, m, at + "prev_sign") && ok;
      if (kKeepsGradSqSum<Kernel> && v.sign_test) {
        ok = same(dev[t].grad_sq_sum, ref[t].grad_sq_sum, m, at + "grad_sq_sum") && ok;
      }
      ok = same(dev[t].step, ref[t].step, 1, at + "step") && ok;
      for (int k = 0; k < num_states; ++k) {
        ok = same(dev[t].state[k], ref[t].state[k], m, at + Kernel::kStates[k]) && ok;
      }
    }
    if (!ok) {
      std::printf("%s:%d: %s differs from the CPU reference at step %zu (boundary %s, "
                  "found_inf %g)\n",
                  __FILE__, __LINE__, label, s, kBoundaryNames[static_cast<int>(b)], found_inf);
      ++g_failures;
      return false;
    }
  }
  return true;
}

// Epochs of 2 steps: the first boundary rolls, later ones update; found_inf on a mid-epoch step
// and on an update step (whose boundary is still applied, the step counter not advanced), after
// which the epoch goes on.
const std::vector<Boundary> kSchedule = {Boundary::kNone,   Boundary::kNone,   Boundary::kRoll,
                                         Boundary::kNone,   Boundary::kUpdate, Boundary::kNone,
                                         Boundary::kUpdate, Boundary::kNone};
const std::vector<int> kInfSteps = {3, 4};

constexpr int64_t kChunk = acu::kChunkSize;

// tensors of 0, 1, odd and chunk-crossing sizes, aligned and misaligned (every stream, or only
// prev_sign: either sends the whole tensor down the scalar path); the chunk-crossing tensor
// alternates between configs: aligned, misaligned, exactly one chunk
std::vector<Shape> shapes_for(uint32_t seed) {
  std::vector<Shape> shapes = {{1, Misalign::kNone},      {0, Misalign::kNone},
                               {7, Misalign::kNone},      {4099, Misalign::kAll},
                               {513, Misalign::kPrevSign}};
  switch (seed % 3) {
    case 0: shapes.insert(shapes.begin() + 3, {kChunk + 3, Misalign::kNone}); break;
    case 1: shapes.insert(shapes.begin() + 3, {kChunk + 5, Misalign::kAll}); break;
    case 2: shapes.insert(shapes.begin() + 3, {kChunk, Misalign::kPrevSign}); break;
  }
  return shapes;
}

template <class Kernel, class P, StatePrecision S>
void run_variants(const char* name, const char* dtype, uint32_t& seed) {
  const int variant = static_cast<int>(seed % 8);
  const bool sign_test = (variant & 4) == 0;
  const Variant v{(variant & 1) != 0,        (variant & 2) != 0, variant % 3 == 1,
                  variant % 4 != 3,          sign_test,          sign_test && variant % 3 == 0,
                  S == StatePrecision::kFull, variant % 2 == 0 ? 0.01 : 0.0};
  run_config<Kernel, P, S>(name, dtype, shapes_for(seed), v, kSchedule, kInfSteps, seed);
  ++seed;
}

template <class Kernel>
void test_kernel(const char* name, uint32_t& seed) {
  constexpr auto F = StatePrecision::kFull, K = StatePrecision::kCompact;
  run_variants<Kernel, float, F>(name, "float32", seed);
  run_variants<Kernel, double, F>(name, "float64", seed);
  run_variants<Kernel, __nv_bfloat16, F>(name, "bfloat16", seed);
  run_variants<Kernel, __half, F>(name, "float16", seed);
  run_variants<Kernel, float, K>(name, "float32", seed);
  run_variants<Kernel, __nv_bfloat16, K>(name, "bfloat16", seed);
  run_variants<Kernel, __half, K>(name, "float16", seed);
  if constexpr (kMomentsInBfloat16<Kernel>) {  // state_precision="bfloat16"
    constexpr auto B = StatePrecision::kBfloat16;
    run_variants<Kernel, float, B>(name, "float32", seed);
    run_variants<Kernel, __nv_bfloat16, B>(name, "bfloat16", seed);
    run_variants<Kernel, __half, B>(name, "float16", seed);
  }
}

// More tensors than one launch's slots: the plan splits between tensors.
template <class Kernel>
void test_many_tensors(const char* name, uint32_t& seed) {
  const int32_t slots = acu::launch_limits<Kernel>().max_tensors;
  std::vector<Shape> shapes;
  for (int32_t t = 0; t < slots + 3; ++t) {
    shapes.push_back({t % 5 == 0 ? 0 : 1 + (t * 37) % 300, t % 3 == 0 ? Misalign::kAll
                                                           : Misalign::kNone});
  }
  std::vector<int64_t> numels;
  for (const Shape& s : shapes) numels.push_back(s.numel);
  const auto plan = plan_launches(numels.data(), static_cast<int32_t>(numels.size()), kChunk,
                                  acu::launch_limits<Kernel>());
  CHECK(plan.size() == 2);
  const uint64_t before = cuda_host::launcher().launches;
  const Variant v{true, true, false, true, true, true, true, 0.01};
  const std::vector<Boundary> schedule = {Boundary::kNone, Boundary::kRoll, Boundary::kUpdate,
                                          Boundary::kUpdate};
  run_config<Kernel, float, StatePrecision::kCompact>(name, "float32", shapes, v, schedule, {2},
                                                      seed++);
  // found_inf skips no launch: every step launches the whole plan
  CHECK(cuda_host::launcher().launches - before == plan.size() * schedule.size());
}

// More blocks than one launch holds (kMaxBlocks chunks): a tensor split across two launches,
// whose step counter only the second advances.
template <class Kernel, class P, StatePrecision S>
void test_split_tensor(const char* name, const char* dtype, uint32_t& seed) {
  const std::vector<Shape> shapes = {{3, Misalign::kNone},
                                     {kChunk * (acu::kMaxBlocks - 1) + 11, Misalign::kNone},
                                     {kChunk + 1, Misalign::kAll},
                                     {0, Misalign::kNone}};
  std::vector<int64_t> numels;
  for (const Shape& s : shapes) numels.push_back(s.numel);
  const auto plan = plan_launches(numels.data(), static_cast<int32_t>(numels.size()), kChunk,
                                  acu::launch_limits<Kernel>());
  CHECK(plan.size() == 2);
  CHECK(plan.size() == 2 && !plan[0].slots.back().finishes && plan[1].slots[0].tensor == 1);
  const std::vector<Boundary> schedule = {Boundary::kRoll, Boundary::kUpdate};
  const Variant v{false, false, true, true, true, false, true, 0.01};
  run_config<Kernel, P, S>(name, dtype, shapes, v, schedule, {}, seed++);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  test_conversions();
  uint32_t seed = 1;
#define TEST_KERNEL(name, Kernel) test_kernel<Kernel>(#name, seed);
  ADAPTIVE_LR_KERNELS(TEST_KERNEL)
#undef TEST_KERNEL
  // the launch limits there are: 8 lists (SGD and Lion: with their grad_sq_sum; RAdam), 9 (the
  // other Adams)
  test_many_tensors<Sgd>("sgd", seed);
  test_many_tensors<RAdam>("radam", seed);
  test_many_tensors<AdamW>("adamw", seed);
  test_split_tensor<AdamW, __nv_bfloat16, StatePrecision::kCompact>("adamw", "bfloat16", seed);
  {  // an empty bucket launches nothing
    const uint64_t before = cuda_host::launcher().launches;
    acu::Bucket<Sgd> empty{DType::kFloat, Boundary::kNone, StatePrecision::kFull, {}, nullptr,
                           nullptr, nullptr, 0};
    CHECK(acu::step<Sgd>(empty, nullptr) == cudaSuccess);
    CHECK(cuda_host::launcher().launches == before);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%lld configs, %lld steps, %llu launches, %llu blocks in %.1f s\n",
              static_cast<long long>(g_configs), static_cast<long long>(g_steps),
              static_cast<unsigned long long>(cuda_host::launcher().launches),
              static_cast<unsigned long long>(cuda_host::launcher().blocks), seconds);
  return report("cuda_host");
}
