// math.h on scalar lanes (float and double), against hand-computed expectations.
#include <cmath>
#include <initializer_list>
#include <iterator>
#include <limits>

#include "adaptive_lr/math.h"
#include "check.h"

using namespace adaptive_lr;

namespace {

CommonHyper hyper(float min_gain = 0, float max_gain = INFINITY, double decay = 1,
                  double grad_divisor = 1, bool divide_grad = false) {
  return {2.0f, 0.5f, min_gain, max_gain, false, false, 0.0, 0.0, decay, grad_divisor, divide_grad};
}

// The paper's gains (2, 0.5, no clamp) with the sign test at threshold k over epochs of S steps.
CommonHyper sign_test_hyper(double k, int64_t epoch_steps, bool relax_gains = false) {
  return common_hyper(2.0, 0.5, 0.0, INFINITY, k, relax_gains, epoch_steps, 0.0, false, 0.0,
                      nullptr);
}

// Kernel K's Hyper from the op's hyperparameter list, in K::kHyper's order.
template <class K>
typename K::Hyper hyper_of(double lr, std::initializer_list<double> values) {
  CHECK(values.size() == std::size(K::kHyper));
  return K::make_hyper(lr, values.begin());
}

// Every tag of the list names its states and hyperparameters consistently.
#define CHECK_TAG(name, K)                                    \
  static_assert(std::size(K::kStates) == K::kMaxStates, #K); \
  static_assert(std::size(K::kHyper) > 0, #K);
ADAPTIVE_LR_KERNELS(CHECK_TAG)
#undef CHECK_TAG

// Gain after one boundary from (gain, prev_sign, grad_sum); also checks the roll-over.
template <Boundary B, class T>
T boundary_gain(T gain, T prev_sign, T grad_sum, const CommonHyper& h = hyper()) {
  const CommonLanes<T> c(h);
  const T expected_sign = grad_sum > 0 ? 1 : grad_sum < 0 ? -1 : 0;
  const T old_sign = prev_sign;
  apply_boundary<B>(c, gain, grad_sum, prev_sign, T(1));  // v is unused without the sign test
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

// The sign test: factor = k^2 S / (1 - beta2^t); G counts where G^2 > factor * v, else its sign
// is 0, and a gain with a zero product is held.
template <class T>
void test_sign_test() {
  const CommonHyper h = sign_test_hyper(2, 4);  // k^2 S = 16
  CHECK(h.sign_test && h.sign_test_numerator == 16 && h.sign_threshold_squared == 4);
  const AdamW::Hyper adamw = hyper_of<AdamW>(1e-3, {0.9, 0.5, 1e-8, 0});
  CHECK(sign_test_factor<AdamW>(h, adamw, 1) == 32);  // 16 / (1 - 0.5)
  // without a second moment the test reads Q, the epoch's sum of g^2: factor k^2, any step
  CHECK(sign_test_factor<Sgd>(h, hyper_of<Sgd>(0.1, {0, 0, 0}), 1) == 4);
  CHECK(sign_test_factor<Lion>(h, hyper_of<Lion>(0.1, {0.9, 0.99}), 7) == 4);
  const CommonLanes<T> c(h, 16);  // v = 1: a sum counts where |G| > 4
  const auto after = [&](T gain, T prev, T sum, T& sign) {
    sign = prev;
    apply_boundary<Boundary::kUpdate>(c, gain, sum, sign, T(1));
    CHECK(sum == 0);
    return gain;
  };
  T sign;
  CHECK(after(1, 1, 4.5, sign) == 3 && sign == 1);     // significant, same sign: + gain_inc
  CHECK(after(1, 1, -4.5, sign) == 0.5 && sign == -1); // significant flip: * gain_dec
  CHECK(after(1, 1, 3.5, sign) == 1 && sign == 0);     // within the noise: held, no sign
  CHECK(after(1, 1, 4, sign) == 1 && sign == 0);       // G^2 == floor: not significant
  CHECK(after(1, 0, 4.5, sign) == 1 && sign == 1);     // no previous sign: held
  CHECK(after(1, 1, 0, sign) == 1 && sign == 0);       // a zero sum (dead unit): held
  // v = 0 with a step-0 factor (inf or NaN): no sign, held
  for (T factor : {T(INFINITY), std::numeric_limits<T>::quiet_NaN()}) {
    T gain = 1, sum = 0, prev = 1;
    apply_boundary<Boundary::kUpdate>(CommonLanes<T>(h, factor), gain, sum, prev, T(0));
    CHECK(gain == 1 && prev == 0);
  }
  // the roll-over applies the test too
  T gain = 1, sum = 3.5, prev = 1;
  apply_boundary<Boundary::kRoll>(c, gain, sum, prev, T(1));
  CHECK(gain == 1 && prev == 0);
}

// relax_gains: a gain the sign test holds moves toward 1 from above, 1 + (gain - 1) * gain_dec;
// a gain at or below 1 is held; an increase or a flip is as without it.
template <class T>
void test_relax_gains() {
  const CommonLanes<T> c(sign_test_hyper(2, 4, true), 16);  // v = 1: a sum counts where |G| > 4
  CHECK(c.relax_gains && !CommonLanes<T>(sign_test_hyper(2, 4), 16).relax_gains);
  const auto after = [&](T gain, T prev, T sum) {
    apply_boundary<Boundary::kUpdate>(c, gain, sum, prev, T(1));
    return gain;
  };
  CHECK(after(9, 1, 3.5) == 5);      // within the noise: halfway back to 1
  CHECK(after(9, 0, 4.5) == 5);      // no previous sign
  CHECK(after(9, 1, 0) == 5);        // a zero sum
  CHECK(after(1.5, 1, 3.5) == 1.25);
  CHECK(after(1, 1, 3.5) == 1);      // at 1: held
  CHECK(after(0.25, 1, 3.5) == 0.25);  // below 1: held (a shrunk gain stays shrunk)
  CHECK(after(9, 1, 4.5) == 11);     // significant, same sign: + gain_inc
  CHECK(after(9, 1, -4.5) == 4.5);   // significant flip: * gain_dec
  // each op rounded to float32, in double lanes too: with d = 0.7 the product (gain - 1) * d is
  // inexact, and rounding it only after the + 1 (or an FMA) would give 0x1.74a61ep+1
  const CommonLanes<T> c7(common_hyper(2.0, 0.7, 0.0, INFINITY, 2, true, 4, 0.0, false, 0.0,
                                       nullptr),
                          16);
  T gain = T(0x1.dd7f98p+1f), sum = 0, prev = 1;
  apply_boundary<Boundary::kUpdate>(c7, gain, sum, prev, T(1));
  CHECK(gain == T(0x1.74a61cp+1f));
}

// One fused step (the tensor's t-th) of a single element for kernel K; returns theta, updates the
// rest in place.
template <Boundary B, class K, class T>
T step(const CommonHyper& h, const typename K::Hyper& kh, double t, T theta, T grad, T& gain,
       T& grad_sum, T& prev_sign, T (&state)[K::kMaxStates]) {
  T grad_sq_sum = 0;  // unused: these steps have no sign test
  fused_step<B>(CommonLanes<T>(h), Update<K, T>(kh, K::step_scalars(kh, t)), theta, grad, gain,
                grad_sum, grad_sq_sum, prev_sign, state);
  return theta;
}

// The sign test of a kernel without a second moment: Q accumulates float32(g)^2 (the product
// rounded to float32 before the sum), is what a boundary compares G^2 with (times k^2), and
// restarts there with this step's g^2; with the test off it is left alone.
template <class K, class T>
void test_grad_sq_sum(const typename K::Hyper& kh) {
  const CommonHyper h = sign_test_hyper(4, 3);  // k^2 = 16
  const CommonLanes<T> c(h, sign_test_factor<K>(h, kh, 5));
  const Update<K, T> update(kh, K::step_scalars(kh, 5));
  T state[K::kMaxStates] = {};
  T theta = 1, gain = 1, sum = 4.5, sq = 1, sign = 1;
  fused_step<Boundary::kNone>(c, update, theta, T(0.1), gain, sum, sq, sign, state);
  // float32 arithmetic, also in double lanes (whose sum the float32 store rounds)
  CHECK(static_cast<float>(sq) == 1.0f + 0.1f * 0.1f);
  sq = 1;  // the boundary: 4.5^2 = 20.25 > 16 * 1, a repeated sign grows the gain
  fused_step<Boundary::kUpdate>(c, update, theta, T(-0.5), gain, sum, sq, sign, state);
  CHECK(gain == 3 && sign == 1 && sq == T(0.25) && sum == T(-0.5));
  sum = 4.5;  // 20.25 <= 16 * 1.5: within the noise, held and no sign
  sq = 1.5;
  fused_step<Boundary::kUpdate>(c, update, theta, T(2), gain, sum, sq, sign, state);
  CHECK(gain == 3 && sign == 0 && sq == 4 && sum == 2);
  const CommonLanes<T> off(hyper());  // the paper's rule: Q is not kept
  sq = 7;
  fused_step<Boundary::kNone>(off, update, theta, T(2), gain, sum, sq, sign, state);
  CHECK(sq == 7);
}

template <class T>
void test_accumulation_and_grad_scaling() {
  const Sgd::Hyper sgd = hyper_of<Sgd>(0.1, {0, 0, 0});
  T gain = 1, sum = 0.25, sign = 1, buf[1] = {0};
  // grad_scale 2 with maximize: divisor -2, so g = -0.25 is accumulated and followed
  const T theta = step<Boundary::kNone, Sgd, T>(hyper(0, INFINITY, 1, -2, true), sgd, 1, 1,
                                                0.5, gain, sum, sign, buf);
  CHECK(sum == 0);
  CHECK(buf[0] == T(-0.25));
  CHECK_CLOSE(theta, 1.025, 1e-7);
  // a boundary first resets the sum, then this step's gradient is accumulated with the new gain
  sum = -1;
  const T theta2 = step<Boundary::kUpdate, Sgd, T>(hyper(), sgd, 1, 1, 0.5, gain, sum, sign,
                                                   buf);
  CHECK(gain == 0.5 && sign == -1 && sum == 0.5);
  CHECK_CLOSE(theta2, 1 - 0.1 * 0.5 * 0.5, 1e-7);
}

template <class T>
void test_sgd() {
  T gain = 2, sum = 0, sign = 0;
  const Sgd::Hyper h = hyper_of<Sgd>(0.1, {0.9, 0.5, 0});
  T buf[1] = {0.2};
  // first step: the buffer is the gradient itself; decay 0.99 is applied before the update
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(0, INFINITY, 0.99), h, 1, 1, 0.5,
                                             gain, sum, sign, buf)),
              0.99 - 0.1 * 2 * 0.5, 1e-7);
  CHECK(buf[0] == T(0.5));
  buf[0] = 0.2;  // later steps: b = 0.9 * 0.2 + 0.5 * 0.5 = 0.43
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(), h, 2, 1, 0.5, gain, sum, sign,
                                             buf)),
              1 - 0.2 * 0.43, 1e-7);
  CHECK_CLOSE(buf[0], 0.43, 1e-7);
  buf[0] = 0.2;  // nesterov: direction g + 0.9 * b = 0.887
  const Sgd::Hyper nesterov = hyper_of<Sgd>(0.1, {0.9, 0.5, 1});
  CHECK_CLOSE((step<Boundary::kNone, Sgd, T>(hyper(), nesterov, 2, 1, 0.5, gain, sum,
                                             sign, buf)),
              1 - 0.2 * 0.887, 1e-7);
}

template <class T>
void test_adamw() {
  T gain = 1, sum = 0, sign = 0;
  // step 1 from zero moments: m = 0.05, v = 0.00025, bc1 = 0.1, bc2 = 0.001, so
  // m_hat = 0.5 and sqrt(v_hat) = 0.5: the update is lr * gain * 0.5 / (0.5 + eps)
  const AdamW::Hyper h = hyper_of<AdamW>(0.01, {0.9, 0.999, 1e-8, 0});
  T st[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdamW, T>(hyper(0, INFINITY, 0.999), h, 1,
                                               1, 0.5, gain, sum, sign, st)),
              0.999 - 0.01 * 0.5 / (0.5 + 1e-8), 1e-6);
  CHECK_CLOSE(st[0], 0.05, 1e-6);
  CHECK_CLOSE(st[1], 0.00025, 1e-6);
  // amsgrad: a larger running max (1.0) is used instead of v
  const AdamW::Hyper ams = hyper_of<AdamW>(0.01, {0.9, 0.999, 1e-8, 1});
  T st2[3] = {0, 0, 1};
  gain = 3;
  CHECK_CLOSE((step<Boundary::kNone, AdamW, T>(hyper(), ams, 1, 1, 0.5, gain,
                                               sum, sign, st2)),
              1 - 0.1 * 3 * 0.05 / (1 / std::sqrt(0.001) + 1e-8), 1e-6);
  CHECK(st2[2] == 1);
}

template <class T>
void test_radam() {
  const RAdam::Hyper h = hyper_of<RAdam>(0.01, {0.9, 0.999, 1e-8});
  CHECK(!radam_rectification(0.999, 5).active);  // rho_5 = 4.996
  CHECK(radam_rectification(0.999, 6).active);   // rho_6 = 5.994
  CHECK_CLOSE(radam_rectification(0.999, 6).r, 0.02582111280185855, 1e-12);
  T gain = 2, sum = 0, sign = 0;
  // un-rectified (t = 1): theta -= lr * gain * m / bc1 = 0.01 * 2 * 0.05 / 0.1
  T st[2] = {0, 0};
  CHECK_CLOSE((step<Boundary::kNone, RAdam, T>(hyper(), h, 1, 1, 0.5, gain, sum,
                                               sign, st)),
              1 - 0.01, 1e-6);
  // rectified (t = 6): theta -= lr * gain * r * (m / bc1) * sqrt(bc2) / (sqrt(v) + eps)
  T st2[2] = {0.1, 0.04};
  const double m = 0.9 * 0.1 + 0.1 * 0.5, v = 0.999 * 0.04 + 0.001 * 0.25;
  const double bc1 = 1 - std::pow(0.9, 6), bc2 = 1 - std::pow(0.999, 6);
  CHECK_CLOSE((step<Boundary::kNone, RAdam, T>(hyper(), h, 6, 1, 0.5, gain, sum,
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
  const AdaBelief::Hyper plain = hyper_of<AdaBelief>(0.01, {0.9, 0.999, eps, 0, 0});
  T st[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdaBelief, T>(hyper(), plain, 1, 1,
                                                   0.5, gain, sum, sign, st)),
              1 - 0.01 / bc1 * m / (std::sqrt(s) / std::sqrt(bc2) + eps), 1e-6);
  CHECK_CLOSE(st[1], s, 1e-6);
  // rectify at t = 1: rho_1 <= 5, so the bias-corrected momentum step lr * gain * m / bc1
  const AdaBelief::Hyper rectified = hyper_of<AdaBelief>(0.01, {0.9, 0.999, eps, 0, 1});
  T st2[3] = {0, 0, 0};
  CHECK_CLOSE((step<Boundary::kNone, AdaBelief, T>(hyper(), rectified,
                                                   1, 1, 0.5, gain,
                                                   sum, sign, st2)),
              1 - 0.01 * m / bc1, 1e-6);
  // amsgrad keeps the max of the running variance
  const AdaBelief::Hyper ams = hyper_of<AdaBelief>(0.01, {0.9, 0.999, eps, 1, 0});
  T st3[3] = {0, 0, 0.5};
  step<Boundary::kNone, AdaBelief, T>(hyper(), ams, 1, 1, 0.5, gain, sum,
                                      sign, st3);
  CHECK(st3[2] == T(0.5));
}

// RAdam is its own tag: it rectifies without any flag, where AdamW (same moments) never does and
// AdaBelief does only with its own rectify flag.
template <class T>
void test_radam_is_its_own_kernel() {
  const RAdam::Hyper radam = hyper_of<RAdam>(0.01, {0.9, 0.999, 1e-8});
  const AdamW::Hyper adamw = hyper_of<AdamW>(0.01, {0.9, 0.999, 1e-8, 0});
  CHECK(!RAdam::step_scalars(radam, 1).adaptive);  // rho_1 <= 5: the momentum step
  CHECK(AdamW::step_scalars(adamw, 1).adaptive);
  CHECK(!adamw.rectify && !radam.rectify);  // rectify is AdaBelief's option only
  T gain = 1, sum = 0, sign = 0, st[2] = {0, 0}, st2[3] = {0, 0, 0};
  const T radam_theta = step<Boundary::kNone, RAdam, T>(hyper(), radam,
                                                        1, 1, 0.5,
                                                        gain, sum, sign, st);
  const T adamw_theta = step<Boundary::kNone, AdamW, T>(hyper(), adamw,
                                                        1, 1, 0.5,
                                                        gain, sum, sign, st2);
  CHECK_CLOSE(radam_theta, 1 - 0.01 * 0.05 / 0.1, 1e-6);
  CHECK_CLOSE(adamw_theta, 1 - 0.01 * 0.5 / (0.5 + 1e-8), 1e-6);
}

// torch.optim.Adam: the moments see g + weight_decay * theta (theta before the update), grad_sum
// sees g alone; with maximize g is the negated gradient before the L2 term is added.
template <class T>
void test_adam() {
  const Adam::Hyper h = hyper_of<Adam>(0.01, {0.9, 0.999, 1e-8, 0, 0.1});
  CHECK(h.l2 == 0.1 && !h.amsgrad && h.num_states() == 2);
  T gain = 1, sum = 0, sign = 0, st[3] = {0, 0, 0};
  // g = 0.5 + 0.1 * 1 = 0.6: m = 0.06, v = 0.00036, m_hat = 0.6 = sqrt(v_hat)
  CHECK_CLOSE((step<Boundary::kNone, Adam, T>(hyper(), h, 1, 1, 0.5, gain,
                                              sum, sign, st)),
              1 - 0.01 * 0.6 / (0.6 + 1e-8), 1e-6);
  CHECK_CLOSE(st[0], 0.06, 1e-6);
  CHECK_CLOSE(st[1], 0.00036, 1e-6);
  CHECK(sum == T(0.5));
  // maximize (divisor -1): g = -0.5 + 0.1 * 1 = -0.4, grad_sum accumulates -0.5
  T st2[3] = {0, 0, 0};
  sum = 0;
  CHECK_CLOSE((step<Boundary::kNone, Adam, T>(hyper(0, INFINITY, 1, -1, true), h,
                                              1, 1, 0.5, gain, sum, sign,
                                              st2)),
              1 + 0.01 * 0.4 / (0.4 + 1e-8), 1e-6);
  CHECK_CLOSE(st2[0], -0.04, 1e-6);
  CHECK(sum == T(-0.5));
  // amsgrad: the running max (1.0) is the denominator's second moment; gain 3; theta 2 makes
  // g = 0.5 + 0.2 = 0.7, m = 0.07
  const Adam::Hyper ams = hyper_of<Adam>(0.01, {0.9, 0.999, 1e-8, 1, 0.1});
  CHECK(ams.amsgrad && ams.num_states() == 3);
  T st3[3] = {0, 0, 1};
  gain = 3;
  CHECK_CLOSE((step<Boundary::kNone, Adam, T>(hyper(), ams, 1, 2, 0.5,
                                              gain, sum, sign, st3)),
              2 - 0.1 * 3 * 0.07 / (1 / std::sqrt(0.001) + 1e-8), 1e-6);
  CHECK(st3[2] == 1);
  CHECK_CLOSE(st3[1], 0.001 * 0.49, 1e-6);
}

// Lion: theta -= lr * gain * sign(beta1 * m + (1 - beta1) * g), then m moves with beta2.
template <class T>
void test_lion() {
  const Lion::Hyper h = hyper_of<Lion>(0.01, {0.9, 0.99});
  T gain = 2, sum = 0, sign = 0;
  // c = 0.9 * 0.2 + 0.1 * 0.5 = 0.23 > 0; decoupled decay 0.99 first
  T m[1] = {0.2};
  CHECK_CLOSE((step<Boundary::kNone, Lion, T>(hyper(0, INFINITY, 0.99), h,
                                              1, 1, 0.5, gain, sum, sign,
                                              m)),
              0.99 - 0.01 * 2, 1e-7);
  CHECK_CLOSE(m[0], 0.99 * 0.2 + 0.01 * 0.5, 1e-6);
  // c = 0.18 - 0.3 < 0: the step goes up
  m[0] = 0.2;
  CHECK_CLOSE((step<Boundary::kNone, Lion, T>(hyper(), h, 1, 1, -3, gain,
                                              sum, sign, m)),
              1 + 0.01 * 2, 1e-7);
  CHECK_CLOSE(m[0], 0.99 * 0.2 - 0.01 * 3, 1e-6);
  // c = 0.5 * 0.5 - 0.5 * 0.5 = 0 exactly: sign(0) = 0, theta stays
  const Lion::Hyper half = hyper_of<Lion>(0.01, {0.5, 0.5});
  m[0] = 0.5;
  CHECK((step<Boundary::kNone, Lion, T>(hyper(), half, 1, 1, -0.5,
                                        gain, sum, sign, m)) == 1);
  CHECK(m[0] == 0);
  // a NaN gradient has sign 0 too: theta stays, the NaN reaches the moment
  m[0] = 0.2;
  CHECK((step<Boundary::kNone, Lion, T>(hyper(), h, 1, 1,
                                        std::numeric_limits<T>::quiet_NaN(), gain, sum, sign,
                                        m)) == 1);
  CHECK(std::isnan(m[0]));
}

template <class T>
void test_all() {
  test_boundary<T>();
  test_sign_test<T>();
  test_relax_gains<T>();
  test_grad_sq_sum<Sgd, T>(hyper_of<Sgd>(0.1, {0.9, 0, 0}));
  test_grad_sq_sum<Lion, T>(hyper_of<Lion>(0.1, {0.9, 0.99}));
  test_accumulation_and_grad_scaling<T>();
  test_sgd<T>();
  test_adamw<T>();
  test_radam<T>();
  test_adabelief<T>();
  test_radam_is_its_own_kernel<T>();
  test_adam<T>();
  test_lion<T>();
}

}  // namespace

// Compact state's roundings: nearest-even (checkpoint conversion, infinities) and the stochastic
// rounding of epoch sums (of g and of g^2) and gains, which must land on one of the two
// neighbouring bfloat16 values and be unbiased over many draws, the three with independent draws.
void test_compact_rounding() {
  CHECK(mix32(0) == 0 && mix32(1) != mix32(2));  // lowbias32 fixes 0
  CHECK(bfloat16_nearest(1.0f) == 0x3f80);
  CHECK(bfloat16_nearest(bit_cast<float>(0x3f808000)) == 0x3f80);  // a tie: to even
  CHECK(bfloat16_nearest(bit_cast<float>(0x3f818000)) == 0x3f82);  // a tie: to even (up)
  CHECK(bfloat16_nearest(bit_cast<float>(0x3f808001)) == 0x3f81);
  CHECK(bfloat16_nearest(INFINITY) == 0x7f80 && bfloat16_nearest(NAN) == 0x7fc0);
  const uint32_t key = rounding_key(7, 3);
  // a compact gain is rounded after its clamp: a max_gain that is no bfloat16 value rounds to
  // one of its neighbours (10.25 or 10.3125)
  float gain = 2, sum = 1, sign = 1;
  CommonHyper h = hyper(0, 10.3f);
  h.gain_inc = 10;
  apply_boundary<Boundary::kUpdate, StatePrecision::kCompact>(CommonLanes<float>(h), gain, sum,
                                                              sign, 0.0f, key, 9);
  CHECK(gain == bfloat16_value(bfloat16_stochastic(10.3f, gain_key(key), 9)));
  CHECK(gain == 10.25f || gain == 10.3125f);
  // x = 1 + 0.3 bfloat16 ulps: rounds up to 1 + 1 ulp with probability 0.3, for grad_sum,
  // grad_sq_sum and a gain, and the three draws of one element are independent (two up:
  // probability 0.09)
  const float x = bit_cast<float>(0x3f800000 + 0x4ccc);
  const uint16_t down = 0x3f80, up = 0x3f81;
  const uint32_t new_gain_key = gain_key(key);
  CHECK(new_gain_key != key);
  int sum_ups = 0, gain_ups = 0, sq_ups = 0, both_up = 0, sq_and_sum_up = 0, sq_and_gain_up = 0;
  const int draws = 1 << 16;
  for (int i = 0; i < draws; ++i) {
    const uint16_t r = bfloat16_stochastic(x, key, static_cast<uint32_t>(i));
    const uint16_t g = bfloat16_stochastic(x, new_gain_key, static_cast<uint32_t>(i));
    const uint16_t q = bfloat16_stochastic_low_bits(x, key, static_cast<uint32_t>(i));
    CHECK((r == down || r == up) && (g == down || g == up) && (q == down || q == up));
    sum_ups += r == up;
    gain_ups += g == up;
    sq_ups += q == up;
    both_up += r == up && g == up;
    sq_and_sum_up += q == up && r == up;
    sq_and_gain_up += q == up && g == up;
  }
  CHECK_CLOSE(sum_ups / double(draws), 0.3, 0.01);  // unbiased: E[r] = x (5 sd of the estimate)
  CHECK_CLOSE(gain_ups / double(draws), 0.3, 0.01);
  CHECK_CLOSE(sq_ups / double(draws), 0.3, 0.01);
  CHECK_CLOSE(both_up / double(draws), 0.09, 0.01);
  CHECK_CLOSE(sq_and_sum_up / double(draws), 0.09, 0.01);
  CHECK_CLOSE(sq_and_gain_up / double(draws), 0.09, 0.01);
  // a bfloat16 moment's draws (state 0 and 1 of a kernel) are independent of the sums' and the
  // gain's, and of each other
  int moment_ups = 0, moment_and_sum_up = 0, moment_and_gain_up = 0, moments_up = 0;
  CHECK(moment_key(key, 0) != key && moment_key(key, 0) != new_gain_key &&
        moment_key(key, 1) != moment_key(key, 0));
  for (int i = 0; i < draws; ++i) {
    const uint32_t index = static_cast<uint32_t>(i);
    const bool m0 = bfloat16_stochastic(x, moment_key(key, 0), index) == up;
    const bool m1 = bfloat16_stochastic(x, moment_key(key, 1), index) == up;
    moment_ups += m0;
    moment_and_sum_up += m0 && bfloat16_stochastic(x, key, index) == up;
    moment_and_gain_up += m0 && bfloat16_stochastic(x, new_gain_key, index) == up;
    moments_up += m0 && m1;
  }
  // within 5 standard deviations of the estimate (0.0018 for 0.3, 0.0011 for 0.09)
  CHECK_CLOSE(moment_ups / double(draws), 0.3, 0.03);
  CHECK_CLOSE(moment_and_sum_up / double(draws), 0.09, 0.07);
  CHECK_CLOSE(moment_and_gain_up / double(draws), 0.09, 0.07);
  CHECK_CLOSE(moments_up / double(draws), 0.09, 0.07);
  CHECK(Ops<float>::round_gain_to_bfloat16(3.0f, key, 5) == 3.0f);  // bfloat16 values stay exact
  CHECK(bfloat16_stochastic(2.0f, key, 5) == 0x4000);
  CHECK(bfloat16_stochastic(-INFINITY, key, 5) == 0xff80);
  CHECK(bfloat16_stochastic(NAN, key, 5) == 0x7fc0);
  CHECK(bfloat16_stochastic(bit_cast<float>(0x7f7fffff), key, 0) >= 0x7f7f);  // may round to inf
  // whatever the draw: an infinity stays itself, a NaN becomes the quiet NaN, even one whose
  // payload a draw would carry into infinity (0x7f800001) or out of the exponent (0x7fffffff)
  for (uint32_t draw : {0U, 1U, 0x8000U, 0xffffU}) {
    CHECK(bfloat16_round_with(INFINITY, draw) == 0x7f80);
    CHECK(bfloat16_round_with(-INFINITY, draw) == 0xff80);
    for (uint32_t nan : {0x7f800001U, 0x7fffffffU, 0xffc00000U, 0xffffffffU}) {
      CHECK(bfloat16_round_with(bit_cast<float>(nan), draw) == 0x7fc0);
    }
  }
}

int main() {
  test_compact_rounding();
  test_all<float>();
  test_all<double>();
  return report("test_math");
}
