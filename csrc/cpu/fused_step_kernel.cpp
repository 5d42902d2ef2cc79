// The fused multi-tensor CPU kernels. setup.py compiles this file once per CPU capability
// (-DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 plus the matching -DCPU_CAPABILITY_* and ISA flags), which
// makes at::vec::Vectorized real SIMD of that width; fused_step.cpp picks the variant at run time.
// Light headers only: this file is compiled three times.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "fused_step.h"

#ifndef CPU_CAPABILITY
#error "compile fused_step_kernel.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

namespace adaptive_lr {
ADAPTIVE_LR_ISA_NAMESPACE_BEGIN

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// math.h's compact-state roundings in integer SIMD, lane k being element first + k. Element by
// element, the unrolled lanes' branch for non-finite values keeps GCC from vectorizing the hash.
// (Not in the scalar build: its Vectorized<int32_t> multiplies signed ints, whose overflow is
// undefined.)
struct SimdRounding {
  using I = at::vec::Vectorized<int32_t>;

  // A logical shift (at::vec's >> is arithmetic).
  template <int N>
  static I shift_right(const I& x) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_srli_epi32(x, N);
#else
    return _mm256_srli_epi32(x, N);
#endif
  }

  // mix32(key + first + k) in lane k.
  static I hash(uint32_t key, uint32_t first) {
    I h = I(static_cast<int32_t>(key + first)) + I::arange(0, 1);
    h = h ^ shift_right<16>(h);
    h = h * I(static_cast<int32_t>(0x7feb352dU));
    h = h ^ shift_right<15>(h);
    h = h * I(static_cast<int32_t>(0x846ca68bU));
    return h ^ shift_right<16>(h);
  }

  // bfloat16_round_with on float32 bit patterns `u` and 16-bit draws: the rounded bits in the
  // high halves of the lanes (the low halves are garbage for a stochastic result). Only NaN
  // needs a lane of its own (infinities round right as they are).
  static I round_with(const I& u, const I& draws) {
    return I::blendv(u + draws, I(0x7fc00000), (u & I(0x7fffffff)) > I(0x7f800000));
  }
};
#endif

// math.h's primitives on SIMD lanes.
template <class C>
struct Ops<at::vec::Vectorized<C>> {
  using V = at::vec::Vectorized<C>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }  // NaN-propagating
  static V minimum(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V sign(const V& x) { return x.gt(V(0)) - x.lt(V(0)); }  // gt/lt give 1.0 or 0.0
  static V where_positive(const V& c, const V& a, const V& b) {
    return V::blendv(b, a, c > V(0));
  }
  static V round_to_float(const V& x) {
    if constexpr (std::is_same_v<C, float>) {
      return x;
    } else {
      __at_align__ C wide[V::size()];
      __at_align__ float narrow[V::size()];
      x.store(wide);
      for (int k = 0; k < V::size(); ++k) narrow[k] = static_cast<float>(wide[k]);
      // GCC 12's -O3 SLP vectorizer drops this double -> float -> double round trip (the
      // double lanes then keep unrounded gains); the empty asm makes it go through memory.
      asm volatile("" : "+m"(narrow));
      for (int k = 0; k < V::size(); ++k) wide[k] = narrow[k];
      return V::loadu(wide);
    }
  }
  // lane k is element index + k (boundary steps only)
  static V round_gain_to_bfloat16(const V& x, uint32_t key, uint32_t index) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<C, float>) {
      using I = SimdRounding::I;
      const I draws = SimdRounding::shift_right<16>(SimdRounding::hash(gain_key(key), index));
      const I rounded = SimdRounding::round_with(at::vec::cast<int32_t>(x), draws);
      return at::vec::cast<float>(rounded & I(static_cast<int32_t>(0xffff0000U)));
    }
#endif
    __at_align__ C lanes[V::size()];
    x.store(lanes);
    for (int k = 0; k < V::size(); ++k) {
      lanes[k] = Ops<C>::round_gain_to_bfloat16(lanes[k], key, index + static_cast<uint32_t>(k));
    }
    return V::loadu(lanes);
  }
};

ADAPTIVE_LR_ISA_NAMESPACE_END

namespace cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <class T>
constexpr bool kReducedFloat = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Loads of memory type X into lane type T and rounding stores back: one element for a scalar T,
// one SIMD group for a Vectorized T.
template <class T>
struct Io {
  template <class X>
  static T load(const X* p) { return static_cast<T>(*p); }
  template <class X>
  static void store(X* p, T v) { *p = static_cast<X>(v); }
  template <class G>
  static void store_gain(G* p, T v) { store(p, v); }
  // A compact grad_sum's store: element `index` of its tensor, rounded with `key`'s draws.
  static void store_stochastic(c10::BFloat16* p, T v, uint32_t key, int64_t index) {
    *p = c10::BFloat16(
        bfloat16_stochastic(static_cast<float>(v), key, static_cast<uint32_t>(index)),
        c10::BFloat16::from_bits());
  }
  // Both compact epoch sums of an element, grad_sum `v` and grad_sq_sum `q`: one hash's two halves.
  static void store_stochastic_sums(c10::BFloat16* p, T v, c10::BFloat16* q_p, T q, uint32_t key,
                                    int64_t index) {
    store_stochastic(p, v, key, index);
    *q_p = c10::BFloat16(
        bfloat16_stochastic_low_bits(static_cast<float>(q), key, static_cast<uint32_t>(index)),
        c10::BFloat16::from_bits());
  }
};

template <class C>
struct Io<Vectorized<C>> {
  using V = Vectorized<C>;
  template <class X>
  static V load(const X* p) {
    if constexpr (std::is_same_v<X, C>) {
      return V::loadu(p);
    } else if constexpr (kReducedFloat<X>) {
      V v;
      at::vec::load_to_float(p, v);
      return v;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (std::is_same_v<X, int8_t> && std::is_same_v<C, float>) {
      return load_signs(p);
#endif
    } else {  // signs or float gains into double lanes: rare paths, through a register-sized buffer
      __at_align__ C lanes[V::size()];
      for (int k = 0; k < V::size(); ++k) lanes[k] = static_cast<C>(p[k]);
      return V::loadu(lanes);
    }
  }
  template <class X>
  static void store(X* p, const V& v) {
    if constexpr (std::is_same_v<X, C>) {
      v.store(p);
    } else if constexpr (kReducedFloat<X>) {
      const Vectorized<X> narrow = at::vec::convert<X>(v);  // round to nearest even
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<C, float>) {
        store_low_half(narrow, p);
        return;
      }
#endif
      narrow.store(p, V::size());
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (std::is_same_v<X, int8_t> && std::is_same_v<C, float>) {
      store_signs(p, v);
#endif
    } else {
      __at_align__ C lanes[V::size()];
      v.store(lanes);
      for (int k = 0; k < V::size(); ++k) p[k] = static_cast<X>(lanes[k]);
    }
  }
  // A new gain. A compact one (bfloat16 G), rounded by round_gain_to_bfloat16, is a bfloat16
  // value already: its lanes' high halves are stored as they are, not rounded to nearest again.
  template <class G>
  static void store_gain(G* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<G, c10::BFloat16> && std::is_same_v<C, float>) {
      store_high_halves(at::vec::cast<int32_t>(v), p);
      return;
    }
#endif
    store(p, v);
  }
  static void store_stochastic(c10::BFloat16* p, const V& v, uint32_t key, int64_t index) {
    static_assert(std::is_same_v<C, float>, "compact state is for float32 compute");
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    using I = SimdRounding::I;
    const I hashed = SimdRounding::hash(key, static_cast<uint32_t>(index));
    const I draws = SimdRounding::shift_right<16>(hashed);
    store_high_halves(SimdRounding::round_with(at::vec::cast<int32_t>(v), draws), p);
#else
    store_each<bfloat16_stochastic>(p, v, key, index);
#endif
  }
  // Both compact epoch sums, grad_sum `v` and grad_sq_sum `q`: one hash per lane, whose high
  // halves are grad_sum's draws and low halves grad_sq_sum's.
  static void store_stochastic_sums(c10::BFloat16* p, const V& v, c10::BFloat16* q_p, const V& q,
                                    uint32_t key, int64_t index) {
    static_assert(std::is_same_v<C, float>, "compact state is for float32 compute");
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    using I = SimdRounding::I;
    const I hashed = SimdRounding::hash(key, static_cast<uint32_t>(index));
    store_high_halves(
        SimdRounding::round_with(at::vec::cast<int32_t>(v), SimdRounding::shift_right<16>(hashed)),
        p);
    store_high_halves(SimdRounding::round_with(at::vec::cast<int32_t>(q), hashed & I(0xffff)), q_p);
#else
    store_each<bfloat16_stochastic>(p, v, key, index);
    store_each<bfloat16_stochastic_low_bits>(q_p, q, key, index);
#endif
  }
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  // The scalar build's roundings, lane by lane (its Vectorized<int32_t> has no wrapping multiply).
  template <uint16_t (*Round)(float, uint32_t, uint32_t)>
  static void store_each(c10::BFloat16* p, const V& v, uint32_t key, int64_t index) {
    const uint32_t first = static_cast<uint32_t>(index);
    __at_align__ uint16_t bits[V::size()];
    __at_align__ float lanes[V::size()];
    v.store(lanes);
    for (int k = 0; k < V::size(); ++k) bits[k] = Round(lanes[k], key, first + k);
    std::memcpy(p, bits, sizeof bits);
  }
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // A boundary step's int8 signs, widened to float lanes and narrowed back in registers (element
  // by element through a buffer, they added a fifth to a boundary step: docs/step_time.md).
  static V load_signs(const int8_t* p) {
    const auto* bytes = reinterpret_cast<const __m128i*>(p);
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
#else
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(bytes)));
#endif
  }
  // v holds signs (-1, 0, 1): truncation is the scalar path's static_cast, and no lane saturates
  static void store_signs(int8_t* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
#else
    const __m256i wide = _mm256_cvttps_epi32(v);
    const __m128i half =
        _mm_packs_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(half, half));
#endif
  }

  // float lanes narrowed to 16 bits fill the low half of their Vectorized<X>: one plain store
  // (ATen's partial store is a masked store with AVX-512, slow on AMD, and a memcpy with AVX2)
  template <class X>
  static void store_low_half(const Vectorized<X>& narrow, X* p) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(narrow));
#else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(narrow));
#endif
  }

  // The narrowing store at::vec lacks; element by element, it alone doubled the cost of an AVX2
  // compact step. The high 16 bits of each lane, stored as V::size() consecutive 16-bit values.
  static void store_high_halves(const Vectorized<int32_t>& x, void* out) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(static_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
#else
    const __m256i high = _mm256_srli_epi32(x, 16);  // 0..65535: packus keeps them exactly
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0xd8);
    _mm_storeu_si128(static_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
#endif
  }
#endif
};

// Calls body(consts, i) for the SIMD groups of [0, n) and then for each element of the tail;
// consts = make(T()) holds the loop constants for lane type T, built once outside the loop.
template <class C, class Make, class Body>
inline void for_each_lane(int64_t n, const Make& make, const Body& body) {
  using V = Vectorized<C>;
  int64_t i = 0;
  const auto vec = make(V());
  for (; i + V::size() <= n; i += V::size()) body(vec, i);
  const auto scalar = make(C());
  for (; i < n; ++i) body(scalar, i);
}

// step_chunk's loop constants for lane type T.
template <class Kernel, class T>
struct Lanes {
  CommonLanes<T> common;
  Update<Kernel, T> update;
};

// The storage type of gain and grad_sum.
template <StatePrecision S>
using SignState = std::conditional_t<compact_sign_state(S), c10::BFloat16, float>;

// The storage type of the moments, for compute type C.
template <StatePrecision S, class C>
using MomentState = std::conditional_t<S == StatePrecision::kBfloat16, c10::BFloat16, C>;

// One chunk of one tensor: the whole step of its elements in a single pass over memory. The
// boundary is a template parameter, so a mid-epoch step never touches prev_sign and only reads gain.
template <Boundary B, StatePrecision S, class Kernel, class P>
void step_chunk(const Bucket<Kernel>& b, const Chunk& chunk) {
  using C = std::conditional_t<std::is_same_v<P, double>, double, float>;  // compute and state type
  using G = SignState<S>;
  using M = MomentState<S, C>;
  constexpr int N = Kernel::kMaxStates;
  const TensorPtrs<Kernel>& t = b.tensors[chunk.tensor];
  const int64_t offset = chunk.offset;
  P* const param = static_cast<P*>(t.param) + offset;
  const P* const grad = static_cast<const P*>(t.grad) + offset;
  G* const gain = static_cast<G*>(t.gain) + offset;
  G* const grad_sum = static_cast<G*>(t.grad_sum) + offset;
  // the sign test's sum of g^2, where it reads one (read, reset at a boundary, accumulated)
  G* const grad_sq_sum =
      kKeepsGradSqSum<Kernel> && b.common.sign_test ? static_cast<G*>(t.grad_sq_sum) + offset
                                                     : nullptr;
  int8_t* const prev_sign = t.prev_sign + offset;
  M* state[N];
  for (int k = 0; k < N; ++k) state[k] = static_cast<M*>(t.state[k]) + offset;
  const int num_states = b.hyper.num_states();
  const auto& scalars = b.scalars[chunk.tensor];
  const uint32_t key = compact_sign_state(S) ? b.rounding_keys[chunk.tensor] : 0;
  uint32_t moment_keys[N]{};
  if constexpr (S == StatePrecision::kBfloat16) {
    for (int k = 0; k < N; ++k) moment_keys[k] = moment_key(key, k);
  }

  for_each_lane<C>(
      chunk.length,
      [&]<class T>(T) {
        return Lanes<Kernel, T>{CommonLanes<T>(b.common, b.sign_test_factors[chunk.tensor]),
                                {b.hyper, scalars}};
      },
      [&]<class T>(const Lanes<Kernel, T>& lanes, int64_t i) {
        using io = Io<T>;
        T g_sum = io::load(grad_sum + i), gamma = io::load(gain + i), sign{}, sq_sum{};
        if constexpr (B != Boundary::kNone) sign = io::load(prev_sign + i);
        if (grad_sq_sum) sq_sum = io::load(grad_sq_sum + i);
        T theta = io::load(param + i);
        T st[N]{};
        for (int k = 0; k < N; ++k) {
          if (k < num_states) st[k] = io::load(state[k] + i);
        }
        fused_step<B, S>(lanes.common, lanes.update, theta, io::load(grad + i), gamma, g_sum,
                         sq_sum, sign, st, key, static_cast<uint32_t>(offset + i));
        if constexpr (B == Boundary::kUpdate) io::store_gain(gain + i, gamma);
        if constexpr (B != Boundary::kNone) io::store(prev_sign + i, sign);
        if constexpr (compact_sign_state(S)) {
          if (grad_sq_sum) {
            io::store_stochastic_sums(grad_sum + i, g_sum, grad_sq_sum + i, sq_sum, key, offset + i);
          } else {
            io::store_stochastic(grad_sum + i, g_sum, key, offset + i);
          }
        } else {
          io::store(grad_sum + i, g_sum);
          if (grad_sq_sum) io::store(grad_sq_sum + i, sq_sum);
        }
        io::store(param + i, theta);
        for (int k = 0; k < N; ++k) {
          if (k >= num_states) continue;
          if constexpr (S == StatePrecision::kBfloat16) {
            io::store_stochastic(state[k] + i, st[k], moment_keys[k], offset + i);
          } else {
            io::store(state[k] + i, st[k]);
          }
        }
      });
}

// A step skipped for found_inf still applies the pending boundary to gain, grad_sum, prev_sign
// and grad_sq_sum (in the compute type of param type P, as a step would: the sign test compares
// in it).
template <Boundary B, StatePrecision S, class Kernel, class P>
void boundary_chunk(const Bucket<Kernel>& b, const Chunk& chunk) {
  using C = std::conditional_t<std::is_same_v<P, double>, double, float>;
  using G = SignState<S>;
  const TensorPtrs<Kernel>& t = b.tensors[chunk.tensor];
  G* const gain = static_cast<G*>(t.gain) + chunk.offset;
  G* const grad_sum = static_cast<G*>(t.grad_sum) + chunk.offset;
  int8_t* const prev_sign = t.prev_sign + chunk.offset;
  const C* moment = nullptr;  // what the sign test reads: v, or Q (then reset with grad_sum)
  G* grad_sq_sum = nullptr;
  if constexpr (kKeepsGradSqSum<Kernel>) {
    if (b.common.sign_test) grad_sq_sum = static_cast<G*>(t.grad_sq_sum) + chunk.offset;
  } else {
    if (b.common.sign_test) moment = static_cast<const C*>(t.state[Kernel::kSecondMoment]) + chunk.offset;
  }
  for_each_lane<C>(
      chunk.length,
      [&]<class T>(T) { return CommonLanes<T>(b.common, b.sign_test_factors[chunk.tensor]); },
      [&]<class T>(const CommonLanes<T>& common, int64_t i) {
        using io = Io<T>;
        T gamma = io::load(gain + i), g_sum = io::load(grad_sum + i), sign = io::load(prev_sign + i);
        const T noise = moment        ? io::load(moment + i)
                        : grad_sq_sum ? io::load(grad_sq_sum + i)
                                      : T(0);
        apply_boundary<B, S>(common, gamma, g_sum, sign, noise,
                             compact_sign_state(S) ? b.rounding_keys[chunk.tensor] : 0,
                             static_cast<uint32_t>(chunk.offset + i));
        if constexpr (B == Boundary::kUpdate) io::store_gain(gain + i, gamma);
        io::store(prev_sign + i, sign);
        io::store(grad_sum + i, g_sum);
        if (grad_sq_sum) io::store(grad_sq_sum + i, T(0));
      });
}

template <Boundary B, StatePrecision S, class Kernel>
void run_chunks(const Bucket<Kernel>& b, int64_t begin, int64_t end) {
  const auto each = [&](auto chunk_fn) {
    for (int64_t c = begin; c < end; ++c) chunk_fn(b, b.chunks[c]);
  };
  // compact state is for float32 compute: the op refuses it for float64 params
  constexpr bool kDoubleOk = S == StatePrecision::kFull;
  if (b.boundary_only) {
    if constexpr (B != Boundary::kNone) {
      // only the compute type matters: float64 params compute in double, all others in float
      if constexpr (kDoubleOk) {
        if (b.dtype == DType::kDouble) return each(boundary_chunk<B, S, Kernel, double>);
      }
      each(boundary_chunk<B, S, Kernel, float>);
    }
    return;
  }
  switch (b.dtype) {
    case DType::kFloat: return each(step_chunk<B, S, Kernel, float>);
    case DType::kDouble:
      if constexpr (kDoubleOk) each(step_chunk<B, S, Kernel, double>);
      return;
    case DType::kBFloat16: return each(step_chunk<B, S, Kernel, c10::BFloat16>);
    case DType::kHalf: return each(step_chunk<B, S, Kernel, c10::Half>);
  }
}

template <Boundary B, class Kernel>
void run_chunks(const Bucket<Kernel>& b, int64_t begin, int64_t end) {
  switch (b.precision) {
    case StatePrecision::kFull: return run_chunks<B, StatePrecision::kFull>(b, begin, end);
    case StatePrecision::kCompact: return run_chunks<B, StatePrecision::kCompact>(b, begin, end);
    case StatePrecision::kBfloat16:
      if constexpr (kMomentsInBfloat16<Kernel>) {
        return run_chunks<B, StatePrecision::kBfloat16>(b, begin, end);
      }
      TORCH_INTERNAL_ASSERT(false, "bfloat16 moments reached a kernel with a second moment, "
                            "which the op refuses before anything is written");
  }
}

}  // namespace

template <class Kernel>
void step_chunks(const Bucket<Kernel>& b, int64_t begin, int64_t end) {
  switch (b.boundary) {
    case Boundary::kNone: return run_chunks<Boundary::kNone>(b, begin, end);
    case Boundary::kRoll: return run_chunks<Boundary::kRoll>(b, begin, end);
    case Boundary::kUpdate: return run_chunks<Boundary::kUpdate>(b, begin, end);
  }
}

#define ADAPTIVE_LR_INSTANTIATE(name, Kernel) \
  template void step_chunks<Kernel>(const Bucket<Kernel>&, int64_t, int64_t);
ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_INSTANTIATE)
#undef ADAPTIVE_LR_INSTANTIATE

}  // namespace cpu::CPU_CAPABILITY
}  // namespace adaptive_lr
