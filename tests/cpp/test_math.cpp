// math.h on scalar lanes (float and double), against hand-computed expectations.
#include <cmath>
#include <limits>

#include "adaptive_lr/math.h"
#include "check.h"

using namespace adaptive_lr;

namespace {

CommonHyper hyper(float min_gain = 0, float max_gain = INFINITY, double decay = 1,
                  double grad_divisor = 1, bool divide_grad = false) {
  return {2.0f, 0.5f, min_gain, max_gain, decay, grad_divisor, divide_grad};
}

// Gain after one boundary from (gain, prev_sign, grad_sum); also checks the roll-over.
template <Boundary B, class T>
T boundary_gain(T gain, T prev_sign, T grad_sum, const CommonHyper& h = hyper()) {
  const CommonLanes<T> c(h);
  const T expected_sign = grad_sum > 0 ? 1 : grad_sum < 0 ? -1 : 0;
  const T old_sign = prev_sign;
  apply_boundary<B>(c, gain, grad_sum, prev_sign);
  CHECK(prev_sign == (B == Boundary::kNone ? old_sign : expected_sign));
  CHECK(B == Boundary::kNone || grad_sum == 0);
  return gain;
}

template <class T>
void test_boundary() {
  constexpr auto U = Boundary::kUpdate;
  CHECK(boundary_gain<U, T>(1, 1, 0.5) == 3);    // same sign: + gain_inc
  CHECK(boundary_gain<U, T>(1, -1, -2) == 3);
  CHECK(boundary_gain<U, T>(1, 1, -0.5) == 0.5);  // flip: * gain_dec
  CHECK(boundary_gain<U, T>(1, -1, 0.5) == 0.5);
  CHECK(boundary_gain<U, T>(1, 1, 0) == 0.5);     // zero sum counts as a flip
  CHECK(boundary_gain<U, T>(1, 0, 0.5) == 0.5);   // no previous sign
  CHECK(boundary_gain<U, T>(1, 1, -1, hyper(0.8f)) == T(0.8f));         // min clamp
  CHECK(boundary_gain<U, T>(1, 1, 1, hyper(0, 2.5f)) == 2.5);           // max clamp
  CHECK(boundary_gain<Boundary::kRoll, T>(1.25, 1, -3) == 1.25);        // roll: gain kept
  CHECK(boundary_gain<Boundary::kNone, T>(1.25, 1, -3) == 1.25);
  // the new gain is float32 state even in double lanes: 0.1f + 2 is rounded to float
  CHECK(boundary_gain<U, T>(T(0.1f), 1, 1) == T(0.1f + 2.0f));
  // NaN sums have sign 0
  const T nan = std::numeric_limits<T>::quiet_NaN();
  CHECK(boundary_gain<U, T>(1, 1, nan) == 0.5);
  CHECK(std::isnan(Ops<T>::maximum(nan, 1)) && std::isnan(Ops<T>::maximum(1, nan)));
}

// One fused step of a single element for kernel K; returns theta, updates the rest in place.
template <Boundary B, class K, class T>
T step(const CommonHyper& h, const typename K::Hyper& kh, const typename K::Scalars& ks, T theta,
       T grad, T& gain, T& grad_sum, T& prev_sign, T (&state)[K::kMaxStates]) {
  fused_step<B>(CommonLanes<T>(h), Update<K, T>(kh, ks), theta, grad, gain, grad_sum, prev_sign,
                state);
  return theta;
}

template <class T>
void test_accumulation_and_grad_scaling() {
  const Sgd::Hyper sgd{0.1, 0, 0, false};
  T gain = 1, sum = 0.25, sign = 1, buf[1] = {0};
  // grad_scale 2 with maximize: divisor -2, so g = -0.25 is accumulated and followed
  const T theta = step<Boundary::kNone, Sgd, T>(hyper(0, INFINITY, 1, -2, true), sgd, {true}, 1,
                                                0.5, gain, sum, sign, buf);
  CHECK(sum == 0);
  CHECK(buf[0] == T(-0.25));
  CHECK_CLOSE(theta, 1.025, 1e-7);
  // a boundary first resets the sum, then this step's gradient is accumulated with the new gain
  sum = -1;
  const T theta2 = step<Boundary::kUpdate, Sgd, T>(hyper(), sgd, {true}, 1, 0.5, gain, sum, sign,
                                                   buf);
  CHECK(gain == 0.5 && sign == -1 && sum == 0.5);
  CHECK_CLOSE(theta2, 1 - 0.1 * 0.5 * 0.5, 1e-7);
}

template <class T>
void test_sgd() {
  T gain = 2, sum = 0, sign = 0;
  const Sgd::Hyper h{0.1, 0.9, 0.5, false};
  T buf[1] = {0.2};
  // first step: the buffer is the gradient itself; decay 0.99 is applied before the update
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(0, INFINITY, 0.99), h, sgd_scalars(1), 1, 0.5,
                                             gain, sum, sign, buf)),
              0.99 - 0.1 * 2 * 0.5, 1e-7);
  CHECK(buf[0] == T(0.5));
  buf[0] = 0.2;  // later steps: b = 0.9 * 0.2 + 0.5 * 0.5 = 0.43
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(), h, sgd_scalars(2), 1, 0.5, gain, sum, sign,
                                             buf)),
              1 - 0.2 * 0.43, 1e-7);
  CHECK_CLOSE(buf[0], 0.43, 1e-7);
  buf[0] = 0.2;  // nesterov: direction g + 0.9 * b = 0.887
  const Sgd::Hyper nesterov{0.1, 0.9, 0.5, true};
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(), nesterov, sgd_scalars(2), 1, 0.5, gain, sum,
                                             sign, buf)),
              1 - 0.2 * 0.887, 1e-7);
}

template <class T>
void test_adamw() {
  T gain = 1, sum = 0, sign = 0;
  // step 1 from zero moments: m = 0.05, v = 0.00025, bc1 = 0.1, bc2 = 0.001, so
  // m_hat = 0.5 and sqrt(v_hat) = 0.5: the update is lr * gain * 0.5 / (0.5 + eps)
  const AdamW::Hyper h{0.01, 0.9, 0.999, 1e-8, false, false};
  T st[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdamW, T>(hyper(0, INFINITY, 0.999), h, adamw_scalars(h, 1),
                                               1, 0.5, gain, sum, sign, st)),
              0.999 - 0.01 * 0.5 / (0.5 + 1e-8), 1e-6);
  CHECK_CLOSE(st[0], 0.05, 1e-6);
  CHECK_CLOSE(st[1], 0.00025, 1e-6);
  // amsgrad: a larger running max (1.0) is used instead of v
  const AdamW::Hyper ams{0.01, 0.9, 0.999, 1e-8, true, false};
  T st2[3] = {0, 0, 1};
  gain = 3;
  CHECK_CLOSE((step<Boundary::kNone, AdamW, T>(hyper(), ams, adamw_scalars(ams, 1), 1, 0.5, gain,
                                               sum, sign, st2)),
              1 - 0.1 * 3 * 0.05 / (1 / std::sqrt(0.001) + 1e-8), 1e-6);
  CHECK(st2[2] == 1);
}

template <class T>
void test_radam() {
  const RAdam::Hyper h{0.01, 0.9, 0.999, 1e-8, false, false};
  CHECK(!radam_rectification(0.999, 5).active);  // rho_5 = 4.996
  CHECK(radam_rectification(0.999, 6).active);   // rho_6 = 5.994
  CHECK_CLOSE(radam_rectification(0.999, 6).r, 0.02582111280185855, 1e-12);
  T gain = 2, sum = 0, sign = 0;
  // un-rectified (t = 1): theta -= lr * gain * m / bc1 = 0.01 * 2 * 0.05 / 0.1
  T st[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, RAdam, T>(hyper(), h, radam_scalars(h, 1), 1, 0.5, gain, sum,
                                               sign, st)),
              1 - 0.01, 1e-6);
  // rectified (t = 6): theta -= lr * gain * r * (m / bc1) * sqrt(bc2) / (sqrt(v) + eps)
  T st2[3] = {0.1, 0.04, 0};
  const double m = 0.9 * 0.1 + 0.1 * 0.5, v = 0.999 * 0.04 + 0.001 * 0.25;
  const double bc1 = 1 - std::pow(0.9, 6), bc2 = 1 - std::pow(0.999, 6);
  CHECK_CLOSE((step<Boundary::kNone, RAdam, T>(hyper(), h, radam_scalars(h, 6), 1, 0.5, gain, sum,
                                               sign, st2)),
              1 - 0.01 * 2 * 0.02582111280185855 * (m / bc1) * std::sqrt(bc2) /
                      (std::sqrt(v) + 1e-8),
              1e-6);
}

template <class T>
void test_adabelief() {
  T gain = 1, sum = 0, sign = 0;
  // m = 0.05, s = 0.001 * (0.5 - 0.05)^2 + eps (eps accumulates inside s)
  const double eps = 1e-6, m = 0.05, s = 0.001 * 0.45 * 0.45 + eps;
  const double bc1 = 0.1, bc2 = 0.001;
  const AdaBelief::Hyper plain{0.01, 0.9, 0.999, eps, false, false};
  T st[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdaBelief, T>(hyper(), plain, adabelief_scalars(plain, 1), 1,
                                                   0.5, gain, sum, sign, st)),
              1 - 0.01 / bc1 * m / (std::sqrt(s) / std::sqrt(bc2) + eps), 1e-6);
  CHECK_CLOSE(st[1], s, 1e-6);
  // rectify at t = 1: rho_1 <= 5, so the bias-corrected momentum step lr * gain * m / bc1
  const AdaBelief::Hyper rectified{0.01, 0.9, 0.999, eps, false, true};
  T st2[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdaBelief, T>(hyper(), rectified,
                                                   adabelief_scalars(rectified, 1), 1, 0.5, gain,
                                                   sum, sign, st2)),
              1 - 0.01 * m / bc1, 1e-6);
  // amsgrad keeps the max of the running variance
  const AdaBelief::Hyper ams{0.01, 0.9, 0.999, eps, true, false};
  T st3[3] = {0, 0, 0.5};
  step<Boundary::kNone, AdaBelief, T>(hyper(), ams, adabelief_scalars(ams, 1), 1, 0.5, gain, sum,
                                      sign, st3);
  CHECK(st3[2] == T(0.5));
}

template <class T>
void test_all() {
  test_boundary<T>();
  test_accumulation_and_grad_scaling<T>();
  test_sgd<T>();
  test_adamw<T>();
  test_radam<T>();
  test_adabelief<T>();
}

}  // namespace

int main() {
  test_all<float>();
  test_all<double>();
  return report("test_math");
}
