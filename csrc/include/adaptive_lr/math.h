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
  double decay;         // 1 - lr * weight_decay: decoupled weight decay, not scaled by the gain
  double grad_divisor;  // g = grad / grad_divisor: grad_scale, negated when maximizing
  bool divide_grad;     // false when there is neither a grad_scale nor maximize
};

// One step's CommonHyper from the op's arguments, lr and *grad_scale (null: no grad scaling) as
// read for this step: by the CPU op on the host, by the CUDA kernels from device memory.
ADAPTIVE_LR_HOST_DEVICE CommonHyper common_hyper(double gain_inc, double gain_dec, double min_gain,
                                                 double max_gain, double weight_decay,
                                                 bool maximize, double lr,
                                                 const float* grad_scale) {
  const double scale = grad_scale != nullptr ? *grad_scale : 1.0;
  return {static_cast<float>(gain_inc),
          static_cast<float>(gain_dec),
          static_cast<float>(min_gain),
          static_cast<float>(max_gain),
          1 - lr * weight_decay,
          maximize ? -scale : scale,  // g / -s == -(g / s) exactly
          grad_scale != nullptr || maximize};
}

// Kernel tags: the per-element code the loops are instantiated for. AdamW and RAdam share one
// (they differ only in their per-tensor scalars), AdaBelief adds the "belief" second moment.
struct Sgd {
  static constexpr int kMaxStates = 1;  // momentum_buffer
  struct Hyper {
    double lr, momentum, dampening;
    bool nesterov;
    ADAPTIVE_LR_HOST_DEVICE int num_states() const { return 1; }
  };
  struct Scalars {
    bool first_step;  // torch.optim.SGD: the buffer starts as a copy of the first gradient
  };
};

template <bool kBelief>
struct Adam {
  static constexpr int kMaxStates = 3;  // exp_avg, exp_avg_sq (exp_avg_var), max_* (amsgrad)
  struct Hyper {
    double lr, beta1, beta2, eps;
    bool amsgrad;
    bool rectify;  // RAdam's rectification: RAdam always, AdaBelief optionally, AdamW never
    ADAPTIVE_LR_HOST_DEVICE int num_states() const { return amsgrad ? 3 : 2; }
  };
  // theta -= step_size * gain * m / (sqrt(v) / sqrt_bc2 + eps) if adaptive, else
  // theta -= step_size * gain * m (RAdam's un-rectified warm-up steps).
  struct Scalars {
    double step_size, sqrt_bc2;
    bool adaptive;
  };
};
using AdamW = Adam<false>;
using RAdam = Adam<false>;
using AdaBelief = Adam<true>;

// ---- per-tensor scalars from the tensor's step t (>= 1), once per tensor per step -----------

ADAPTIVE_LR_HOST_DEVICE Sgd::Scalars sgd_scalars(double step) { return {step == 1}; }

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

ADAPTIVE_LR_HOST_DEVICE AdamW::Scalars adamw_scalars(const AdamW::Hyper& h, double step) {
  const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
  return {h.lr / bc1, std::sqrt(bc2), true};
}

// theta -= lr * r * (m / bc1) * sqrt(bc2) / (sqrt(v) + eps): the bias correction of v moves into
// the step size, so the denominator is sqrt(v) / 1 + eps.
ADAPTIVE_LR_HOST_DEVICE RAdam::Scalars radam_scalars(const RAdam::Hyper& h, double step) {
  const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
  const Rectification rect = radam_rectification(h.beta2, step);
  if (!rect.active) return {h.lr / bc1, 1.0, false};
  return {h.lr * rect.r * std::sqrt(bc2) / bc1, 1.0, true};
}

ADAPTIVE_LR_HOST_DEVICE AdaBelief::Scalars adabelief_scalars(const AdaBelief::Hyper& h,
                                                             double step) {
  const double bc1 = 1 - std::pow(h.beta1, step), bc2 = 1 - std::pow(h.beta2, step);
  const Rectification rect =
      h.rectify ? radam_rectification(h.beta2, step) : Rectification{true, 1.0};
  return {h.lr * rect.r / bc1, std::sqrt(bc2), rect.active};
}

// The per-tensor scalars of each kernel tag (Adam<false>: RAdam when rectify, else AdamW).
ADAPTIVE_LR_HOST_DEVICE Sgd::Scalars step_scalars(const Sgd::Hyper&, double step) {
  return sgd_scalars(step);
}
ADAPTIVE_LR_HOST_DEVICE Adam<false>::Scalars step_scalars(const Adam<false>::Hyper& h,
                                                          double step) {
  return h.rectify ? radam_scalars(h, step) : adamw_scalars(h, step);
}
ADAPTIVE_LR_HOST_DEVICE Adam<true>::Scalars step_scalars(const Adam<true>::Hyper& h,
                                                         double step) {
  return adabelief_scalars(h, step);
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
};

// Bucket-level constants broadcast to lane type T once per loop.
template <class T>
struct CommonLanes {
  T gain_inc, gain_dec, min_gain, max_gain, decay, grad_divisor;
  bool divide_grad;
  ADAPTIVE_LR_HOST_DEVICE explicit CommonLanes(const CommonHyper& h)
      : gain_inc(T(h.gain_inc)), gain_dec(T(h.gain_dec)), min_gain(T(h.min_gain)),
        max_gain(T(h.max_gain)), decay(T(h.decay)), grad_divisor(T(h.grad_divisor)),
        divide_grad(h.divide_grad) {}
};

// The epoch boundary (docs/algorithm.md). prev_sign holds -1, 0 or +1 as a T. The new gain is
// rounded to float32 (a no-op for float lanes) before it is used: gains are float32 state.
template <Boundary B, class T>
ADAPTIVE_LR_HOST_DEVICE void apply_boundary(const CommonLanes<T>& c, T& gain, T& grad_sum,
                                            T& prev_sign) {
  if constexpr (B != Boundary::kNone) {
    const T sign = Ops<T>::sign(grad_sum);
    if constexpr (B == Boundary::kUpdate) {
      // same sign: the steps were too small (additive increase); flip or zero: too large
      gain = Ops<T>::round_to_float(
          Ops<T>::where_positive(prev_sign * sign, gain + c.gain_inc, gain * c.gain_dec));
      gain = Ops<T>::minimum(Ops<T>::maximum(gain, c.min_gain), c.max_gain);
    }
    prev_sign = sign;
    grad_sum = T(0);
  }
}

// The base optimizer's update of one element of theta (already weight-decayed) and its state,
// with the element's learning-rate gain gamma.
template <class Kernel, class T>
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

template <bool kBelief, class T>
struct Update<Adam<kBelief>, T> {
  using K = Adam<kBelief>;
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, sqrt_bc2;
  bool amsgrad, adaptive;

  ADAPTIVE_LR_HOST_DEVICE Update(const typename K::Hyper& h, const typename K::Scalars& s)
      : beta1(T(h.beta1)), one_minus_beta1(T(1 - h.beta1)), beta2(T(h.beta2)),
        one_minus_beta2(T(1 - h.beta2)), eps(T(h.eps)), step_size(T(s.step_size)),
        sqrt_bc2(T(s.sqrt_bc2)), amsgrad(h.amsgrad), adaptive(s.adaptive) {}

  ADAPTIVE_LR_HOST_DEVICE void operator()(T& theta, T g, T gamma,
                                          T (&state)[K::kMaxStates]) const {
    T& m = state[0];
    T& v = state[1];
    m = beta1 * m + one_minus_beta1 * g;
    if constexpr (kBelief) {
      // AdaBelief: the variance of g around the new m, with eps accumulating inside it
      const T residual = g - m;
      v = beta2 * v + one_minus_beta2 * residual * residual + eps;
    } else {
      v = beta2 * v + one_minus_beta2 * g * g;
    }
    if (amsgrad) state[2] = Ops<T>::maximum(state[2], v);
    const T second = amsgrad ? state[2] : v;
    theta = adaptive ? theta - step_size * gamma * m / (Ops<T>::sqrt(second) / sqrt_bc2 + eps)
                     : theta - step_size * gamma * m;
  }
};

// One element's whole step, registers in and out (loads and stores are the caller's): the
// boundary, the gradient's unscaling/negation, its accumulation into grad_sum, weight decay and
// the base update with the new gain. A step skipped for found_inf calls apply_boundary alone.
template <Boundary B, class Kernel, class T>
ADAPTIVE_LR_HOST_DEVICE void fused_step(const CommonLanes<T>& c, const Update<Kernel, T>& update,
                                        T& theta, T grad, T& gain, T& grad_sum, T& prev_sign,
                                        T (&state)[Kernel::kMaxStates]) {
  apply_boundary<B>(c, gain, grad_sum, prev_sign);
  const T g = c.divide_grad ? grad / c.grad_divisor : grad;
  grad_sum = grad_sum + Ops<T>::round_to_float(g);
  theta = theta * c.decay;
  update(theta, g, gain, state);
}

ADAPTIVE_LR_ISA_NAMESPACE_END

}  // namespace adaptive_lr

// ================================ Active(optimizer) ============================================

namespace adaptive_lr {
ADAPTIVE_LR_ISA_NAMESPACE_BEGIN

// One element of Active(optimizer)'s pass after its inner optimizer moved theta from
// theta_before (docs/active_wrapper.md): the epoch boundary, then the inner step scaled by the
// (new) gain, theta_before + gain * (theta - theta_before), and the gradient into the epoch sum.
// Where the gain is 1 theta is kept as it is: the formula would round it.
template <Boundary B, class T>
ADAPTIVE_LR_HOST_DEVICE void scale_inner_step(const CommonLanes<T>& c, T& theta, T theta_before,
                                              T grad, T& gain, T& grad_sum, T& prev_sign) {
  apply_boundary<B>(c, gain, grad_sum, prev_sign);
  // (gain - 1)^2 > 0 exactly when gain != 1: a float32 gain is 1 or at least 2^-24 away from it
  const T off_one = gain - T(1);
  theta = Ops<T>::where_positive(off_one * off_one, theta_before + gain * (theta - theta_before),
                                 theta);
  const T g = c.divide_grad ? grad / c.grad_divisor : grad;
  grad_sum = grad_sum + Ops<T>::round_to_float(g);
}

ADAPTIVE_LR_ISA_NAMESPACE_END
}  // namespace adaptive_lr
