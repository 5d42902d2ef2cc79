// The Active optimizers' CUDA step: one functor, templated on math.h's kernel tag (one per
// optimizer, ADAPTIVE_LR_KERNELS), the boundary kind, the state precision and the param dtype, run by
// multi_tensor_apply with one block per chunk. Per element it calls math.h's fused_step (or
// apply_boundary alone when found_inf skips the step): the functions the CPU kernels call.
//
// Rounding: nvcc's defaults give IEEE-rounded division and sqrt (no fast math), and the build
// passes --fmad=false, because the CPU kernels are compiled with -ffp-contract=off: without FMA
// contraction on either side both backends round every operation of math.h identically, so the
// C++ tests of math.h on the CPU test the very arithmetic the GPU executes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fused_step.h"
#include "multi_tensor_apply.cuh"

namespace adaptive_lr::cuda {

// ---- loads and stores --------------------------------------------------------------------------

// W consecutive elements, aligned for one access of sizeof(X) * W bytes (a 16-byte access, or
// two for 32 bytes).
template <class X, int W>
struct alignas(sizeof(X) * W) Pack {
  X v[W];
};

template <int W, class X>
__device__ __forceinline__ Pack<X, W> load(const X* p) {
  return *reinterpret_cast<const Pack<X, W>*>(p);
}

template <int W, class X>
__device__ __forceinline__ void store(X* p, const Pack<X, W>& value) {
  *reinterpret_cast<Pack<X, W>*>(p) = value;
}

template <int W, class X>
__device__ __forceinline__ bool aligned_for(const X* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<X, W>) == 0;
}

// Param elements to compute lanes and back; reduced floats round to nearest even, once, on store.
template <class C, class X>
__device__ __forceinline__ C to_lane(X x) {
  if constexpr (std::is_same_v<X, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<X, __half>) {
    return __half2float(x);
  } else {
    return static_cast<C>(x);
  }
}

template <class X, class C>
__device__ __forceinline__ X from_lane(C x) {
  if constexpr (std::is_same_v<X, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else if constexpr (std::is_same_v<X, __half>) {
    return __float2half_rn(x);
  } else {
    return static_cast<X>(x);
  }
}

// Calls f(std::integral_constant<int, W>, i) for elements [i, i + W) of [0, length), once each:
// the block's threads stride over whole packs of kVec elements when `vectorized`, then over the
// remaining single elements (all of them when not `vectorized`).
template <int kVec, class F>
__device__ __forceinline__ void for_each_pack(int length, bool vectorized, const F& f) {
  const int packs = vectorized ? length / kVec : 0;
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    f(std::integral_constant<int, kVec>(), p * kVec);
  }
  for (int i = packs * kVec + threadIdx.x; i < length; i += blockDim.x) {
    f(std::integral_constant<int, 1>(), i);
  }
}

// gain and grad_sum: float, or (compact state) bfloat16 as its bits, converted by math.h's
// functions so that the rounding is the one every backend does; the moments likewise: the
// compute type C, or (StatePrecision::kBfloat16) bfloat16 bits.
template <StatePrecision S>
using SignState = std::conditional_t<compact_sign_state(S), uint16_t, float>;

template <StatePrecision S, class C>
using MomentState = std::conditional_t<S == StatePrecision::kBfloat16, uint16_t, C>;

template <class C, class X>
__device__ __forceinline__ C state_value(X x) {
  if constexpr (std::is_same_v<X, uint16_t>) {
    return bfloat16_value(x);
  } else {
    return x;
  }
}

// ---- the functor -------------------------------------------------------------------------------

template <Boundary B, StatePrecision S, class Kernel, class P>
struct ActiveStep {
  using G = SignState<S>;
  static constexpr int kThreads = 512;
  using C = std::conditional_t<std::is_same_v<P, double>, double, float>;  // compute and state
  using M = MomentState<S, C>;
  // elements per pack: one 16-byte access of every compute-type stream (states, gain and
  // grad_sum for float; bf16/fp16 params and grads then move 8 bytes, more would cost registers)
  static constexpr int kVec = 16 / static_cast<int>(sizeof(C));
  static constexpr int kMaxStates = Kernel::kMaxStates;

  // Read from device memory by thread 0 and shared with the block.
  struct BlockScalars {
    CommonHyper common;
    typename Kernel::Hyper hyper;
    typename Kernel::Scalars scalars;
    double sign_test_factor;  // from the step count before this step
    uint32_t rounding_key;    // compact state: rounding_key(seed, next_step)
    uint32_t moment_keys[kMaxStates];  // kBfloat16: moment_key(rounding_key, k)
    float next_step;
    bool skip;  // found_inf: apply a due boundary, nothing else
  };

  // One chunk of one tensor, every pointer advanced to the chunk's first element.
  struct ChunkPtrs {
    P* param;
    const P* grad;
    G* gain;
    G* grad_sum;
    G* grad_sq_sum;  // the sign test's sum of g^2 where it reads one, else null
    int64_t offset;  // of the chunk's first element in its tensor (compact state's index)
    int8_t* prev_sign;
    M* state[kMaxStates];
    int num_states;

    __device__ bool vectorizable() const {
      bool ok = aligned_for<kVec>(param) && aligned_for<kVec>(grad) && aligned_for<kVec>(gain) &&
                aligned_for<kVec>(grad_sum) && aligned_for<kVec>(grad_sq_sum) &&
                aligned_for<kVec>(prev_sign);
      for (int k = 0; k < kMaxStates; ++k) {  // a constant bound: state[] stays in registers
        if (k < num_states) ok = ok && aligned_for<kVec>(state[k]);
      }
      return ok;
    }
  };

  static __device__ BlockScalars block_scalars(const StepArgs<Kernel>& a, float step,
                                               uint32_t rounding_seed) {
    BlockScalars s;
    const double lr = a.lr_is_double ? *static_cast<const double*>(a.lr)
                                     : *static_cast<const float*>(a.lr);
    s.common = common_hyper(a.gain_inc, a.gain_dec, a.min_gain, a.max_gain, a.sign_threshold,
                            a.relax_gains, a.epoch_steps, a.weight_decay, a.maximize, lr,
                            a.grad_scale);
    s.hyper = a.hyper;
    s.hyper.lr = lr;
    s.sign_test_factor = sign_test_factor<Kernel>(s.common, s.hyper, static_cast<double>(step));
    s.skip = a.found_inf != nullptr && *a.found_inf != 0;
    s.next_step = step + 1;  // float32, like the reference's steps[i].add_(1)
    s.scalars = Kernel::step_scalars(s.hyper, static_cast<double>(s.next_step));
    s.rounding_key = rounding_key(rounding_seed, static_cast<uint32_t>(s.next_step));
    for (int k = 0; k < kMaxStates; ++k) s.moment_keys[k] = moment_key(s.rounding_key, k);
    return s;
  }

  template <int W>
  static __device__ void step_elements(const ChunkPtrs& c, int i, const CommonLanes<C>& common,
                                       const Update<Kernel, C>& update, uint32_t key,
                                       const uint32_t (&moment_keys)[kMaxStates]) {
    Pack<P, W> param = load<W>(c.param + i);
    const Pack<P, W> grad = load<W>(c.grad + i);
    Pack<G, W> gain = load<W>(c.gain + i);
    Pack<G, W> grad_sum = load<W>(c.grad_sum + i);
    Pack<G, W> grad_sq_sum{};
    if (c.grad_sq_sum) grad_sq_sum = load<W>(c.grad_sq_sum + i);
    Pack<int8_t, W> sign{};
    if constexpr (B != Boundary::kNone) sign = load<W>(c.prev_sign + i);
    Pack<M, W> state[kMaxStates]{};
    for (int k = 0; k < kMaxStates; ++k) {
      if (k < c.num_states) state[k] = load<W>(c.state[k] + i);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      C theta = to_lane<C>(param.v[j]), gamma = state_value<C>(gain.v[j]),
        sum = state_value<C>(grad_sum.v[j]), sq_sum = state_value<C>(grad_sq_sum.v[j]),
        prev = sign.v[j];
      C st[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k) st[k] = state_value<C>(state[k].v[j]);
      const uint32_t index = static_cast<uint32_t>(c.offset + i + j);
      fused_step<B, S>(common, update, theta, to_lane<C>(grad.v[j]), gamma, sum, sq_sum, prev, st,
                       key, index);
      param.v[j] = from_lane<P>(theta);
      if constexpr (compact_sign_state(S)) {
        gain.v[j] = bfloat16_nearest(gamma);  // already a bfloat16 value: exact
        grad_sum.v[j] = bfloat16_stochastic(sum, key, index);
        if (c.grad_sq_sum) grad_sq_sum.v[j] = bfloat16_stochastic_low_bits(sq_sum, key, index);
      } else {
        gain.v[j] = static_cast<float>(gamma);
        grad_sum.v[j] = static_cast<float>(sum);
        grad_sq_sum.v[j] = static_cast<float>(sq_sum);
      }
      sign.v[j] = static_cast<int8_t>(prev);
      for (int k = 0; k < kMaxStates; ++k) {
        if constexpr (S == StatePrecision::kBfloat16) {
          state[k].v[j] = bfloat16_stochastic(st[k], moment_keys[k], index);
        } else {
          state[k].v[j] = st[k];
        }
      }
    }
    store<W>(c.param + i, param);
    store<W>(c.grad_sum + i, grad_sum);
    if (c.grad_sq_sum) store<W>(c.grad_sq_sum + i, grad_sq_sum);
    if constexpr (B == Boundary::kUpdate) store<W>(c.gain + i, gain);
    if constexpr (B != Boundary::kNone) store<W>(c.prev_sign + i, sign);
    for (int k = 0; k < kMaxStates; ++k) {
      if (k < c.num_states) store<W>(c.state[k] + i, state[k]);
    }
  }

  // A step skipped for found_inf still applies the due boundary (in the compute type, as a step
  // would: the sign test compares in it), and resets grad_sq_sum with grad_sum.
  template <int W>
  static __device__ void boundary_elements(const ChunkPtrs& c, int i,
                                           const CommonLanes<C>& common, uint32_t key) {
    Pack<G, W> gain = load<W>(c.gain + i);
    Pack<G, W> grad_sum = load<W>(c.grad_sum + i);
    Pack<int8_t, W> sign = load<W>(c.prev_sign + i);
    Pack<C, W> noise{};  // what the sign test reads: v, or Q
    if constexpr (kKeepsGradSqSum<Kernel>) {
      if (c.grad_sq_sum) {
        const Pack<G, W> sq_sum = load<W>(c.grad_sq_sum + i);
        for (int j = 0; j < W; ++j) noise.v[j] = state_value<C>(sq_sum.v[j]);
      }
    } else {
      if (common.sign_test) noise = load<W>(c.state[Kernel::kSecondMoment] + i);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      C gamma = state_value<C>(gain.v[j]), sum = state_value<C>(grad_sum.v[j]), prev = sign.v[j];
      apply_boundary<B, S>(common, gamma, sum, prev, noise.v[j], key,
                           static_cast<uint32_t>(c.offset + i + j));
      if constexpr (compact_sign_state(S)) {
        gain.v[j] = bfloat16_nearest(gamma);
        grad_sum.v[j] = 0;  // the boundary reset it
      } else {
        gain.v[j] = static_cast<float>(gamma);
        grad_sum.v[j] = static_cast<float>(sum);
      }
      sign.v[j] = static_cast<int8_t>(prev);
    }
    if constexpr (B == Boundary::kUpdate) store<W>(c.gain + i, gain);
    store<W>(c.prev_sign + i, sign);
    store<W>(c.grad_sum + i, grad_sum);
    if (c.grad_sq_sum) store<W>(c.grad_sq_sum + i, Pack<G, W>{});  // reset with grad_sum
  }

  // The block's tensor's step counter advances once, after every block of the tensor has read it:
  // the block that arrives last writes it. Thread 0 is the only reader of the counter in a block.
  static __device__ void advance_step(const LaunchMetadata<Kernel>& meta, int32_t* arrivals,
                                      int slot, float* step, float next_step) {
    const int32_t blocks = meta.finishing_blocks[slot];
    if (threadIdx.x != 0 || blocks == 0) return;  // 0: the tensor continues in the next launch
    if (blocks > 1) {
      __threadfence();  // release: this block's read of *step happens before its arrival
      if (atomicAdd(arrivals + slot, 1) != blocks - 1) return;
      __threadfence();  // acquire: every other block's read happened before this write
      arrivals[slot] = 0;  // for the next launch (stream order makes it visible there)
    }
    *step = next_step;
  }

  static __device__ void block(const LaunchMetadata<Kernel>& meta,
                               const StepArgs<Kernel>& args) {
    const int slot = meta.block_slot[blockIdx.x];
    const int64_t offset = int64_t{meta.block_chunk[blockIdx.x]} * kChunkSize;
    const int64_t left = meta.numels[slot] - offset;
    const int length = static_cast<int>(left < kChunkSize ? left : kChunkSize);  // 0: empty tensor
    float* const step = static_cast<float*>(meta.addresses[kStep][slot]);

    __shared__ BlockScalars shared;
    if (threadIdx.x == 0) shared = block_scalars(args, *step, meta.rounding_seeds[slot]);
    __syncthreads();
    const BlockScalars s = shared;

    ChunkPtrs c;
    c.param = static_cast<P*>(meta.addresses[kParam][slot]) + offset;
    c.grad = static_cast<const P*>(meta.addresses[kGrad][slot]) + offset;
    c.gain = static_cast<G*>(meta.addresses[kGain][slot]) + offset;
    c.grad_sum = static_cast<G*>(meta.addresses[kGradSum][slot]) + offset;
    c.grad_sq_sum = nullptr;
    if constexpr (kKeepsGradSqSum<Kernel>) {
      if (s.common.sign_test) {
        c.grad_sq_sum = static_cast<G*>(meta.addresses[kGradSqSum<Kernel>][slot]) + offset;
      }
    }
    c.offset = offset;
    c.prev_sign = static_cast<int8_t*>(meta.addresses[kPrevSign][slot]) + offset;
    c.num_states = s.hyper.num_states();
    for (int k = 0; k < kMaxStates; ++k) {
      c.state[k] = k < c.num_states ? static_cast<M*>(meta.addresses[kState0 + k][slot]) + offset
                                    : nullptr;
    }
    const bool vectorized = c.vectorizable();

    if (s.skip) {
      if constexpr (B != Boundary::kNone) {
        const CommonLanes<C> common(s.common, s.sign_test_factor);
        for_each_pack<kVec>(length, vectorized, [&](auto w, int i) {
          boundary_elements<decltype(w)::value>(c, i, common, s.rounding_key);
        });
      }
      return;  // the step counter stays
    }
    const CommonLanes<C> common(s.common, s.sign_test_factor);
    const Update<Kernel, C> update(s.hyper, s.scalars);
    for_each_pack<kVec>(length, vectorized, [&](auto w, int i) {
      step_elements<decltype(w)::value>(c, i, common, update, s.rounding_key, s.moment_keys);
    });
    advance_step(meta, args.arrivals, slot, step, s.next_step);
  }
};

// ---- dispatch ----------------------------------------------------------------------------------

template <Boundary B, StatePrecision S, class Kernel>
cudaError_t step_with_precision(const Bucket<Kernel>& b, const std::vector<Launch>& plan,
                                cudaStream_t stream) {
  const auto run = [&](auto param) {
    using Functor = ActiveStep<B, S, Kernel, decltype(param)>;
    return multi_tensor_apply<Functor, Kernel>(plan, b.tensors, b.numels, b.rounding_seeds,
                                               b.args, stream);
  };
  switch (b.dtype) {
    case DType::kFloat: return run(float());
    case DType::kDouble:
      // compact state is for float32 compute: the op refuses it for float64 params
      if constexpr (S == StatePrecision::kFull) return run(double());
      break;
    case DType::kBFloat16: return run(__nv_bfloat16());
    case DType::kHalf: return run(__half());
  }
  return cudaErrorInvalidValue;
}

template <Boundary B, class Kernel>
cudaError_t step_with_boundary(const Bucket<Kernel>& b, const std::vector<Launch>& plan,
                               cudaStream_t stream) {
  switch (b.precision) {
    case StatePrecision::kFull: return step_with_precision<B, StatePrecision::kFull>(b, plan, stream);
    case StatePrecision::kCompact:
      return step_with_precision<B, StatePrecision::kCompact>(b, plan, stream);
    case StatePrecision::kBfloat16:
      // the op refuses bfloat16 moments for the other kernels
      if constexpr (kMomentsInBfloat16<Kernel>) {
        return step_with_precision<B, StatePrecision::kBfloat16>(b, plan, stream);
      }
      break;
  }
  return cudaErrorInvalidValue;
}

template <class Kernel>
cudaError_t step(const Bucket<Kernel>& b, cudaStream_t stream) {
  const std::vector<Launch> plan =
      plan_launches(b.numels, b.num_tensors, kChunkSize, launch_limits<Kernel>());
  switch (b.boundary) {
    case Boundary::kNone: return step_with_boundary<Boundary::kNone>(b, plan, stream);
    case Boundary::kRoll: return step_with_boundary<Boundary::kRoll>(b, plan, stream);
    case Boundary::kUpdate: return step_with_boundary<Boundary::kUpdate>(b, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace adaptive_lr::cuda
