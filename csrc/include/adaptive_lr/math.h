// The per-element ActiveLR step (docs/algorithm.md), written once for every backend that compiles
// C++: the CPU kernels run it on float/double and on at::vec::Vectorized lanes, the CUDA kernels on
// float/double. Torch-free on purpose.
//
// A lane type T is float, double, or a SIMD vector of either; the only operations used beyond
// + - * / are those of Ops<T>, which a vector backend specializes for its vector type.
//
// Two halves:
//  * per-step side (plain structs, namespace adaptive_lr): bucket-level hyperparameters and the
//    per-tensor scalars derived once per tensor per step, in double, from the tensor's step count
//    (on the host by the CPU op, on the device by the CUDA kernels, which read the step counter
//    from device memory: one definition for both);
//  * element side (namespace adaptive_lr, plus one inline namespace per CPU capability when
//    compiled per capability): Ops, the gain rule, the optimizer updates and fused_step.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ADAPTIVE_LR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ADAPTIVE_LR_HOST_DEVICE inline
#endif

// A CPU kernel source compiled once per capability (-DCPU_CAPABILITY=AVX512 ...) gives every
// element-side function its own namespace, so the linker never merges, e.g., the AVX-512 copy of
// an out-of-line scalar instantiation into the build that must run on an AVX2-only machine.
#if defined(CPU_CAPABILITY)
#define ADAPTIVE_LR_ISA_NAMESPACE_BEGIN inline namespace CPU_CAPABILITY {
#define ADAPTIVE_LR_ISA_NAMESPACE_END }
#else
#define ADAPTIVE_LR_ISA_NAMESPACE_BEGIN
#define ADAPTIVE_LR_ISA_NAMESPACE_END
#endif

namespace adaptive_lr {

// ================================ per-step side ================================================

// Same values as adaptive_lr.backends.bucket.Boundary.
enum class Boundary : int { kNone = 0, kRoll = 1, kUpdate = 2 };

// Bucket-level constants every optimizer shares.
struct CommonHyper {
  // The gain rule in float32, as the reference applies it to the float32 gains.
  float gain_inc, gain_dec, min_gain, max_gain;
  // The sign test (sign_threshold k > 0; docs/algorithm.md): an epoch sum G counts as a sign
  // only where G^2 > k^2 S / (1 - beta2^t) * v (v the second moment), or G^2 > k^2 Q for a kernel
  // without one (Q the epoch's sum of g^2), and a gain with no sign to compare is held, or, with
  // relax_gains, a gain above 1 moves toward 1: 1 + (gain - 1) * gain_dec.
  bool sign_test, relax_gains;
  double sign_threshold_squared;  // k^2
  double sign_test_numerator;     // k^2 S, S the length of the epoch that ended
  double decay;         // 1 - lr * weight_decay: decoupled weight decay, not scaled by the gain
  double grad_divisor;  // g = grad / grad_divisor: grad_scale, negated when maximizing
  bool divide_grad;     // false when there is neither a grad_scale nor maximize
};

// One step's CommonHyper from the op's arguments, lr and *grad_scale (null: no grad scaling) as
// read for this step: by the CPU op on the host, by the CUDA kernels from device memory.
ADAPTIVE_LR_HOST_DEVICE CommonHyper common_hyper(double gain_inc, double gain_dec, double min_gain,
                                                 double max_gain, double sign_threshold,
                                                 bool relax_gains, int64_t epoch_steps,
                                                 double weight_decay,
                                                 bool maximize, double lr,
                                                 const float* grad_scale) {
  const double scale = grad_scale != nullptr ? *grad_scale : 1.0;
  const double k2 = sign_threshold * sign_threshold;
  return {static_cast<float>(gain_inc),
          static_cast<float>(gain_dec),
          static_cast<float>(min_gain),
          static_cast<float>(max_gain),
          sign_threshold > 0,
          relax_gains,
          k2,
          k2 * static_cast<double>(epoch_steps),
          1 - lr * weight_decay,
          maximize ? -scale : scale,  // g / -s == -(g / s) exactly
          grad_scale != nullptr || maximize};
}

// ---- kernel tags ------------------------------------------------------------------------------
//
// One tag per optimizer, listed once in ADAPTIVE_LR_KERNELS (after the element side): every
// instantiation (CPU kernels, CUDA kernels, the op's name -> kernel dispatch) expands that list.
// A tag carries what the generic code needs:
//  * kHyper: its hyperparameters in the op's order (`hyper`, a float list; flags as 0.0/1.0), each
//    with its valid range, and make_hyper(lr, values) building its Hyper from them. The names are
//    those the optimizer's spec gives its values (kernel_hyper): the op kernel_signature reports
//    them, and the fused backends order the spec's values by them;
//  * kStates: its state lists in the op's order (the spec's state keys), kMaxStates of them;
//    Hyper::num_states() says how many a call uses (amsgrad's running maximum is the optional
//    last one);
//  * Scalars and step_scalars(hyper, t): what is derived once per tensor per step from its step t;
//  * kSecondMoment: the index of the state the sign test compares an epoch sum with (Hyper::beta2
//    then exists), -1 for none: the test then reads the epoch's sum of g^2 (grad_sq_sum), which
//    the op takes as a list of its own while the test is on (kKeepsGradSqSum);
//  * its per-element update: Update<Tag, T>, in the element side below.
// tests/test_kernel_metadata.py checks kHyper's names, kStates and kSecondMoment against the
// optimizer's spec and its Triton update.

// The valid values of a hyperparameter (checked by the op before anything is written).
enum class HyperRange {
  kFlag,         // 0 or 1 (a bool)
  kNonNegative,  // >= 0
  kBeta,         // [0, 1)
  kUnit,         // [0, 1]
};

struct HyperSpec {
  const char* name;
  HyperRange range;
};

struct Sgd {
  static constexpr HyperSpec kHyper[] = {{"momentum", HyperRange::kNonNegative},
                                         {"dampening", HyperRange::kUnit},
                                         {"nesterov", HyperRange::kFlag}};
  static constexpr const char* kStates[] = {"momentum_buffer"};
  static constexpr int kMaxStates = 1;
  static constexpr int kSecondMoment = -1;  // the sign test reads grad_sq_sum
  struct Hyper {
    double lr, momentum, dampening;
    bool nesterov;
    ADAPTIVE_LR_HOST_DEVICE int num_states() const { return 1; }
  };
  static Hyper make_hyper(double lr, const double* v) { return {lr, v[0], v[1], v[2] != 0}; }
  struct Scalars {
    bool first_step;  // torch.optim.SGD: the buffer starts as a copy of the first gradient
  };
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper&, double step) {
    return {step == 1};
  }
};

// The Adam family: first moment m, a second moment (of g, or AdaBelief's of g - m), an optional
// running maximum of it (amsgrad), and a step size from the per-tensor scalars:
// theta -= step_size * gain * m / (sqrt(v) / sqrt_bc2 + eps) if adaptive, else
// theta -= step_size * gain * m (the un-rectified warm-up steps of RAdam and AdaBelief).
struct AdamFamily {
  static constexpr int kMaxStates = 3;  // 2 for a member without amsgrad
  static constexpr int kSecondMoment = 1;  // exp_avg_sq (AdaBelief: exp_avg_var), never the max
  struct Hyper {
    double lr, beta1, beta2, eps;
    double l2;     // coupled weight decay (torch.optim.Adam): the moments see g + l2 * theta
    bool amsgrad;  // the running maximum of the second moment is the third state
    bool rectify;  // AdaBelief's option: RAdam's rectification (RAdam has its own step_scalars)
    ADAPTIVE_LR_HOST_DEVICE int num_states() const { return amsgrad ? 3 : 2; }
  };
  struct Scalars {
    double step_size, sqrt_bc2;
    bool adaptive;
  };
  // Defaults of the traits a family member may override.
  static constexpr bool kBelief = false;  // the second moment tracks (g - m)^2 + eps
  static constexpr bool kL2 = false;      // Hyper::l2 is used
};

struct Rectification {
  bool active;  // rho_t > 5
  double r;
};

// RAdam's variance rectification r_t, used once the SMA length rho_t exceeds 5.
ADAPTIVE_LR_HOST_DEVICE Rectification radam_rectification(double beta2, double step) {
  const double rho_inf = 2 / (1 - beta2) - 1;
  const double beta2_t = std::pow(beta2, step);
  const double rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t);
  if (!(rho_t > 5)) return {false, 1.0};
  return {true, std::sqrt((rho_t - 4) * (rho_t - 2) * rho_inf /
                          ((rho_inf - 4) * (rho_inf - 2) * rho_t))};
}

// Adam's bias-corrected step: theta -= lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps); with
// `rectify`, RAdam's r_t multiplies it, and below the threshold the step is lr * m / bc1.
ADAPTIVE_LR_HOST_DEVICE AdamFamily::Scalars adam_scalars(const AdamFamily::Hyper& h,
                                                         double step) {
  const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
  const Rectification rect =
      h.rectify ? radam_rectification(h.beta2, step) : Rectification{true, 1.0};
  return {h.lr * rect.r / bc1, std::sqrt(bc2), rect.active};
}

struct AdamW : AdamFamily {
  static constexpr HyperSpec kHyper[] = {{"beta1", HyperRange::kBeta},
                                         {"beta2", HyperRange::kBeta},
                                         {"eps", HyperRange::kNonNegative},
                                         {"amsgrad", HyperRange::kFlag}};
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static Hyper make_hyper(double lr, const double* v) {
    return {lr, v[0], v[1], v[2], 0, v[3] != 0, false};
  }
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper& h, double step) {
    return adam_scalars(h, step);
  }
};

// torch.optim.Adam: weight decay coupled as an L2 term of the gradient the moments see (the op's
// decoupled weight_decay is then 0). grad_sum still accumulates the loss gradient alone.
struct Adam : AdamFamily {
  static constexpr HyperSpec kHyper[] = {{"beta1", HyperRange::kBeta},
                                         {"beta2", HyperRange::kBeta},
                                         {"eps", HyperRange::kNonNegative},
                                         {"amsgrad", HyperRange::kFlag},
                                         {"weight_decay", HyperRange::kNonNegative}};
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr bool kL2 = true;
  static Hyper make_hyper(double lr, const double* v) {
    return {lr, v[0], v[1], v[2], v[4], v[3] != 0, false};
  }
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper& h, double step) {
    return adam_scalars(h, step);
  }
};

// RAdam always rectifies, with the current step's moments; the bias correction of v moves into the
// step size: theta -= lr * r * (m / bc1) * sqrt(bc2) / (sqrt(v) / 1 + eps).
struct RAdam : AdamFamily {
  static constexpr HyperSpec kHyper[] = {{"beta1", HyperRange::kBeta},
                                         {"beta2", HyperRange::kBeta},
                                         {"eps", HyperRange::kNonNegative}};
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  static constexpr int kMaxStates = 2;
  static Hyper make_hyper(double lr, const double* v) {
    return {lr, v[0], v[1], v[2], 0, false, false};
  }
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper& h, double step) {
    const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
    const Rectification rect = radam_rectification(h.beta2, step);
    if (!rect.active) return {h.lr / bc1, 1.0, false};
    return {h.lr * rect.r * std::sqrt(bc2) / bc1, 1.0, true};
  }
};

// AdaBelief: the "belief" second moment; rectify (RAdam's threshold and fallback) is its option.
struct AdaBelief : AdamFamily {
  static constexpr HyperSpec kHyper[] = {{"beta1", HyperRange::kBeta},
                                         {"beta2", HyperRange::kBeta},
                                         {"eps", HyperRange::kNonNegative},
                                         {"amsgrad", HyperRange::kFlag},
                                         {"rectify", HyperRange::kFlag}};
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_var", "max_exp_avg_var"};
  static constexpr bool kBelief = true;
  static Hyper make_hyper(double lr, const double* v) {
    return {lr, v[0], v[1], v[2], 0, v[3] != 0, v[4] != 0};
  }
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper& h, double step) {
    return adam_scalars(h, step);
  }
};

// Lion (Chen et al. 2023, as the lion-pytorch package): the sign of an interpolation of momentum
// and gradient. No bias correction: the step count only counts.
struct Lion {
  static constexpr HyperSpec kHyper[] = {{"beta1", HyperRange::kBeta},
                                         {"beta2", HyperRange::kBeta}};
  static constexpr const char* kStates[] = {"exp_avg"};
  static constexpr int kMaxStates = 1;
  static constexpr int kSecondMoment = -1;  // its exp_avg is a momentum: the test reads grad_sq_sum
  struct Hyper {
    double lr, beta1, beta2;
    ADAPTIVE_LR_HOST_DEVICE int num_states() const { return 1; }
  };
  static Hyper make_hyper(double lr, const double* v) { return {lr, v[0], v[1]}; }
  struct Scalars {};
  static ADAPTIVE_LR_HOST_DEVICE Scalars step_scalars(const Hyper&, double) { return {}; }
};

// Whether kernel K's sign test reads an epoch's sum of g^2 (grad_sq_sum), for lack of a second
// moment: the op then takes one grad_sq_sum per tensor while the test is on.
template <class K>
constexpr bool kKeepsGradSqSum = K::kSecondMoment < 0;

// Whether kernel K may keep its state in bfloat16 (StatePrecision::kBfloat16): only momenta, which
// stochastic rounding keeps unbiased; a second moment is left in float32 (docs/precision.md).
template <class K>
constexpr bool kMomentsInBfloat16 = K::kSecondMoment < 0;

// The sign test's factor for one tensor whose step count (before this step) is `step`: its
// epoch sum G counts as a sign where G^2 > factor * v (or factor * Q: the factor is then k^2).
// Step 0 (never stepped: v = 0, G = 0) divides by 0; any factor then gives "no sign".
template <class Kernel>
ADAPTIVE_LR_HOST_DEVICE double sign_test_factor(const CommonHyper& c,
                                                const typename Kernel::Hyper& h, double step) {
  if constexpr (kKeepsGradSqSum<Kernel>) {
    return c.sign_threshold_squared;
  } else {
    return c.sign_test_numerator / (1 - std::pow(h.beta2, step));
  }
}

// ---- compact state: bfloat16 gains and epoch sums (state_precision="compact") -----------------
//
// A compact gain and a compact epoch sum are rounded stochastically, up or down with the
// probabilities that make the rounding unbiased, from bits drawn from a counter-based hash of
// (the param's rounding seed, its step count, the element's index): grad_sum with the hash's high
// 16 bits, grad_sq_sum (where it is kept) with its low 16 bits, a new gain (on a boundary step)
// with the high 16 bits of a hash under a key of its own (gain_key). Every backend draws the same
// bits, so they agree bit for bit (docs/algorithm.md, "Compact state"). Rounding a gain to the
// nearest bfloat16 would lose every increment below half an ulp (gain_inc=0.5 stops at 128).
// These scalar functions are the one definition; the CPU kernels' AVX2/AVX-512 builds compute
// the epoch sums' bits in integer SIMD (fused_step_kernel.cpp), checked against them.

// kBfloat16 (state_precision="bfloat16"): compact state, and the moments in bfloat16 too, each
// rounded stochastically at every step under a key of its own (moment_key). Only for kernels whose
// state is momenta (kMomentsInBfloat16): only a momentum was measured in bfloat16
// (docs/precision.md).
enum class StatePrecision : int { kFull = 0, kCompact = 1, kBfloat16 = 2 };

// Whether gain, grad_sum and grad_sq_sum are bfloat16 (rounded stochastically).
ADAPTIVE_LR_HOST_DEVICE constexpr bool compact_sign_state(StatePrecision s) {
  return s != StatePrecision::kFull;
}

// The bits of a float and back (memcpy: defined behaviour, and free, on host and device).
template <class To, class From>
ADAPTIVE_LR_HOST_DEVICE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// A 32-bit integer hash with good avalanche (C. Wellons' "lowbias32").
ADAPTIVE_LR_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// One tensor's key for one step: its rounding seed and its step count after this step's
// increment (1 on the first step).
ADAPTIVE_LR_HOST_DEVICE uint32_t rounding_key(uint32_t seed, uint32_t step) {
  return mix32(seed ^ mix32(step));
}

// The bits of x rounded to the nearest bfloat16, ties to even (NaN stays a quiet NaN).
ADAPTIVE_LR_HOST_DEVICE uint16_t bfloat16_nearest(float x) {
  if (x != x) return 0x7fc0;
  const uint32_t u = bit_cast<uint32_t>(x);
  return static_cast<uint16_t>((u + 0x7fffU + ((u >> 16) & 1U)) >> 16);
}

// The bits of x rounded stochastically to bfloat16 with the 16 uniform bits `draw`: adding them
// below the kept bits and truncating rounds up with probability equal to the dropped fraction, so
// E[result] = x. An infinity stays one (its low 16 bits are 0: the draw cannot carry); a NaN
// becomes the quiet NaN, as in bfloat16_nearest (a draw could carry its payload into infinity).
ADAPTIVE_LR_HOST_DEVICE uint16_t bfloat16_round_with(float x, uint32_t draw) {
  if (x != x) return 0x7fc0;
  return static_cast<uint16_t>((bit_cast<uint32_t>(x) + draw) >> 16);
}

// A compact grad_sum: element `index`'s draw under `key`, the hash's high 16 bits.
ADAPTIVE_LR_HOST_DEVICE uint16_t bfloat16_stochastic(float x, uint32_t key, uint32_t index) {
  return bfloat16_round_with(x, mix32(key + index) >> 16);
}

// A compact grad_sq_sum: the same hash's low 16 bits (independent of the high ones), so that a
// step hashes each element once for both epoch sums.
ADAPTIVE_LR_HOST_DEVICE uint16_t bfloat16_stochastic_low_bits(float x, uint32_t key,
                                                              uint32_t index) {
  return bfloat16_round_with(x, mix32(key + index) & 0xffffU);
}

// A new compact gain is rounded as a grad_sum (bfloat16_stochastic) under this key: the step's key
// salted and hashed again, so that its draws are independent of both sums' (one more hash per
// element, on a boundary step only).
ADAPTIVE_LR_HOST_DEVICE uint32_t gain_key(uint32_t key) { return mix32(key ^ 0x9e3779b9U); }

// A bfloat16 moment (state k of its kernel) is rounded as a grad_sum under this key: the step's key
// salted per state and hashed again, independent of the sums' and the gain's draws (one more hash
// per element and moment, at every step).
ADAPTIVE_LR_HOST_DEVICE uint32_t moment_key(uint32_t key, int k) {
  return mix32(key ^ (0x85ebca6bU + static_cast<uint32_t>(k)));
}

ADAPTIVE_LR_HOST_DEVICE float bfloat16_value(uint16_t bits) {
  return bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// ================================ element side =================================================

ADAPTIVE_LR_ISA_NAMESPACE_BEGIN

ADAPTIVE_LR_HOST_DEVICE float scalar_sqrt(float x) { return sqrtf(x); }
ADAPTIVE_LR_HOST_DEVICE double scalar_sqrt(double x) { return sqrt(x); }

// Element-wise primitives for scalar lanes; vector backends specialize Ops for their vector type.
template <class T>
struct Ops {
  static ADAPTIVE_LR_HOST_DEVICE T sqrt(T x) { return scalar_sqrt(x); }
  // NaN-propagating, like torch.maximum / torch.clamp.
  static ADAPTIVE_LR_HOST_DEVICE T maximum(T a, T b) { return (a > b || a != a) ? a : b; }
  static ADAPTIVE_LR_HOST_DEVICE T minimum(T a, T b) { return (a < b || a != a) ? a : b; }
  // -1, 0 or +1 (0 for NaN).
  static ADAPTIVE_LR_HOST_DEVICE T sign(T x) { return T(int(x > T(0)) - int(x < T(0))); }
  static ADAPTIVE_LR_HOST_DEVICE T where_positive(T c, T a, T b) { return c > T(0) ? a : b; }
  // The value rounded to float32 (grad_sum accumulates float32 even for float64 params).
  static ADAPTIVE_LR_HOST_DEVICE T round_to_float(T x) { return T(static_cast<float>(x)); }
  // A new compact gain, float32, rounded stochastically to bfloat16 (element `index`, the step's
  // `key`).
  static ADAPTIVE_LR_HOST_DEVICE T round_gain_to_bfloat16(T x, uint32_t key, uint32_t index) {
    return T(bfloat16_value(bfloat16_stochastic(static_cast<float>(x), gain_key(key), index)));
  }
};

// Bucket-level constants (and one tensor's sign-test factor) broadcast to lane type T once per
// loop.
template <class T>
struct CommonLanes {
  T gain_inc, gain_dec, min_gain, max_gain, sign_test_factor, decay, grad_divisor;
  bool sign_test, relax_gains, divide_grad;
  ADAPTIVE_LR_HOST_DEVICE explicit CommonLanes(const CommonHyper& h, double sign_test_factor = 0)
      : gain_inc(T(h.gain_inc)), gain_dec(T(h.gain_dec)), min_gain(T(h.min_gain)),
        max_gain(T(h.max_gain)), sign_test_factor(T(sign_test_factor)), decay(T(h.decay)),
        grad_divisor(T(h.grad_divisor)), sign_test(h.sign_test), relax_gains(h.relax_gains),
        divide_grad(h.divide_grad) {}
};

// The epoch boundary (docs/algorithm.md). prev_sign holds -1, 0 or +1 as a T; noise is what the
// sign test compares G^2 with, times the factor: the element's v or Q before this step
// (sign_test_noise; read only by the sign test). The new gain is rounded to its
// storage type before it is used: float32 (a no-op for float lanes), or bfloat16 for compact
// state, stochastically with the step's `key` for element `index` (the first lane's, for SIMD
// lanes), after the clamp.
template <Boundary B, StatePrecision S = StatePrecision::kFull, class T>
ADAPTIVE_LR_HOST_DEVICE void apply_boundary(const CommonLanes<T>& c, T& gain, T& grad_sum,
                                            T& prev_sign, T noise, uint32_t key = 0,
                                            uint32_t index = 0) {
  if constexpr (B != Boundary::kNone) {
    T sign = Ops<T>::sign(grad_sum);
    if (c.sign_test) {  // a sum within the epoch's gradient noise counts as no sign
      sign = Ops<T>::where_positive(grad_sum * grad_sum - c.sign_test_factor * noise, sign, T(0));
    }
    if constexpr (B == Boundary::kUpdate) {
      // same sign: the steps were too small (additive increase); a flip: too large; a zero
      // product decreases too in the paper's rule, and is held under the sign test (relaxed
      // toward 1 from above with relax_gains)
      const T agreement = prev_sign * sign;
      T held = gain;
      if (c.relax_gains) {
        const T excess = Ops<T>::round_to_float(gain - T(1));  // each op rounded as in float32
        held = Ops<T>::where_positive(excess, Ops<T>::round_to_float(excess * c.gain_dec) + T(1),
                                      gain);
      }
      const T decreased = c.sign_test
                              ? Ops<T>::where_positive(T(0) - agreement, gain * c.gain_dec, held)
                              : gain * c.gain_dec;
      gain = Ops<T>::round_to_float(
          Ops<T>::where_positive(agreement, gain + c.gain_inc, decreased));
      gain = Ops<T>::minimum(Ops<T>::maximum(gain, c.min_gain), c.max_gain);
      if constexpr (compact_sign_state(S)) {
        gain = Ops<T>::round_gain_to_bfloat16(gain, key, index);
      }
    }
    prev_sign = sign;
    grad_sum = T(0);
  }
}

// What the sign test of the element reads: its v, or its Q for a kernel without a second moment.
template <class Kernel, class T>
ADAPTIVE_LR_HOST_DEVICE T sign_test_noise(const T (&state)[Kernel::kMaxStates], T grad_sq_sum) {
  if constexpr (kKeepsGradSqSum<Kernel>) {
    return grad_sq_sum;
  } else {
    return state[Kernel::kSecondMoment];
  }
}

// The base optimizer's update of one element of theta (already weight-decayed) and its state,
// with the element's learning-rate gain gamma.
template <class Kernel, class T, class Enable = void>
struct Update;

template <class T>
struct Update<Sgd, T> {
  T lr, momentum, one_minus_dampening;
  bool nesterov, first_step;

  ADAPTIVE_LR_HOST_DEVICE Update(const Sgd::Hyper& h, const Sgd::Scalars& s)
      : lr(T(h.lr)), momentum(T(h.momentum)), one_minus_dampening(T(1 - h.dampening)),
        nesterov(h.nesterov), first_step(s.first_step) {}

  ADAPTIVE_LR_HOST_DEVICE void operator()(T& theta, T g, T gamma,
                                          T (&state)[Sgd::kMaxStates]) const {
    T& buf = state[0];
    buf = first_step ? g : momentum * buf + one_minus_dampening * g;
    const T direction = nesterov ? g + momentum * buf : buf;
    theta = theta - lr * gamma * direction;
  }
};

// Every member of the Adam family: one update, specialized at compile time by its traits.
template <class K, class T>
struct AdamUpdate {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, step_size, sqrt_bc2;
  bool amsgrad, adaptive;

  ADAPTIVE_LR_HOST_DEVICE AdamUpdate(const AdamFamily::Hyper& h, const AdamFamily::Scalars& s)
      : beta1(T(h.beta1)), one_minus_beta1(T(1 - h.beta1)), beta2(T(h.beta2)),
        one_minus_beta2(T(1 - h.beta2)), eps(T(h.eps)), l2(T(h.l2)), step_size(T(s.step_size)),
        sqrt_bc2(T(s.sqrt_bc2)), amsgrad(h.amsgrad), adaptive(s.adaptive) {}

  ADAPTIVE_LR_HOST_DEVICE void operator()(T& theta, T grad, T gamma,
                                          T (&state)[K::kMaxStates]) const {
    T& m = state[0];
    T& v = state[1];
    T g = grad;
    if constexpr (K::kL2) g = g + l2 * theta;  // theta before this step's update
    m = beta1 * m + one_minus_beta1 * g;
    if constexpr (K::kBelief) {
      // AdaBelief: the variance of g around the new m, with eps accumulating inside it
      const T residual = g - m;
      v = beta2 * v + one_minus_beta2 * residual * residual + eps;
    } else {
      v = beta2 * v + one_minus_beta2 * g * g;
    }
    T second = v;
    if constexpr (K::kMaxStates > 2) {
      if (amsgrad) second = state[2] = Ops<T>::maximum(state[2], v);
    }
    theta = adaptive ? theta - step_size * gamma * m / (Ops<T>::sqrt(second) / sqrt_bc2 + eps)
                     : theta - step_size * gamma * m;
  }
};

template <class K, class T>
struct Update<K, T, std::enable_if_t<std::is_base_of_v<AdamFamily, K>>> : AdamUpdate<K, T> {
  using AdamUpdate<K, T>::AdamUpdate;
};

template <class T>
struct Update<Lion, T> {
  T lr, beta1, one_minus_beta1, beta2, one_minus_beta2;

  ADAPTIVE_LR_HOST_DEVICE Update(const Lion::Hyper& h, const Lion::Scalars&)
      : lr(T(h.lr)), beta1(T(h.beta1)), one_minus_beta1(T(1 - h.beta1)), beta2(T(h.beta2)),
        one_minus_beta2(T(1 - h.beta2)) {}

  ADAPTIVE_LR_HOST_DEVICE void operator()(T& theta, T g, T gamma,
                                          T (&state)[Lion::kMaxStates]) const {
    T& m = state[0];
    const T direction = Ops<T>::sign(beta1 * m + one_minus_beta1 * g);  // sign(0) = sign(NaN) = 0
    theta = theta - lr * gamma * direction;
    m = beta2 * m + one_minus_beta2 * g;
  }
};

// One element's whole step, registers in and out (loads and stores are the caller's): the
// boundary, the gradient's unscaling/negation, its accumulation into grad_sum (and, where the sign
// test reads it, its square into grad_sq_sum), weight decay and the base update with the new
// gain. A step skipped for found_inf calls apply_boundary alone (and resets grad_sq_sum to 0).
// A compact grad_sum leaves here in float32; its store rounds it (bfloat16_stochastic, with the
// same `key` and `index` as a new compact gain's rounding here); a compact grad_sq_sum likewise
// (bfloat16_stochastic_low_bits, the same hash). grad_sq_sum is unused (and set to 0 at a
// boundary) unless kKeepsGradSqSum<Kernel> and the sign test is on.
template <Boundary B, StatePrecision S = StatePrecision::kFull, class Kernel, class T>
ADAPTIVE_LR_HOST_DEVICE void fused_step(const CommonLanes<T>& c, const Update<Kernel, T>& update,
                                        T& theta, T grad, T& gain, T& grad_sum, T& grad_sq_sum,
                                        T& prev_sign, T (&state)[Kernel::kMaxStates],
                                        uint32_t key = 0, uint32_t index = 0) {
  apply_boundary<B, S>(c, gain, grad_sum, prev_sign, sign_test_noise<Kernel>(state, grad_sq_sum),
                       key, index);
  if constexpr (B != Boundary::kNone) grad_sq_sum = T(0);  // reset with grad_sum
  const T g = c.divide_grad ? grad / c.grad_divisor : grad;
  const T g32 = Ops<T>::round_to_float(g);
  grad_sum = grad_sum + g32;
  if constexpr (kKeepsGradSqSum<Kernel>) {
    // float32: the product rounded before the sum (no FMA; double lanes round it explicitly)
    if (c.sign_test) grad_sq_sum = grad_sq_sum + Ops<T>::round_to_float(g32 * g32);
  }
  theta = theta * c.decay;
  update(theta, g, gain, state);
}

ADAPTIVE_LR_ISA_NAMESPACE_END

}  // namespace adaptive_lr

// Every kernel: X(name, Tag), name being the op's `kernel` argument. Adding an optimizer is its
// tag and Update above and one line here; everything else expands this list.
#define ADAPTIVE_LR_KERNELS(X) \
  X(sgd, Sgd)                  \
  X(adamw, AdamW)              \
  X(radam, RAdam)              \
  X(adabelief, AdaBelief)      \
  X(adam, Adam)                \
  X(lion, Lion)

// ================================ Active(optimizer) ============================================

namespace adaptive_lr {
ADAPTIVE_LR_ISA_NAMESPACE_BEGIN

// One element of Active(optimizer)'s pass after its inner optimizer moved theta from
// theta_before (docs/active_wrapper.md): the epoch boundary, then the inner step scaled by the
// (new) gain, theta_before + gain * (theta - theta_before), and the gradient into the epoch sum.
// Where the gain is 1 theta is kept as it is: the formula would round it. `noise`: what the sign
// test multiplies by the tensor's factor (the wrapper's epoch sum of g^2, or the inner
// optimizer's second moment); read only at a boundary with the sign test on.
template <Boundary B, class T>
ADAPTIVE_LR_HOST_DEVICE void scale_inner_step(const CommonLanes<T>& c, T& theta, T theta_before,
                                              T grad, T& gain, T& grad_sum, T& prev_sign,
                                              T noise) {
  apply_boundary<B>(c, gain, grad_sum, prev_sign, noise);
  // (gain - 1)^2 > 0 exactly when gain != 1: a float32 gain is 1 or at least 2^-24 away from it
  const T off_one = gain - T(1);
  theta = Ops<T>::where_positive(off_one * off_one, theta_before + gain * (theta - theta_before),
                                 theta);
  const T g = c.divide_grad ? grad / c.grad_divisor : grad;
  grad_sum = grad_sum + Ops<T>::round_to_float(g);
}

ADAPTIVE_LR_ISA_NAMESPACE_END
}  // namespace adaptive_lr
