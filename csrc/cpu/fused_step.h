// The fused CPU step: what the op layer (csrc/ops.cpp) hands the kernels. Torch-free: raw
// pointers of already validated, contiguous tensors, so the kernel sources compile quickly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "adaptive_lr/chunks.h"
#include "adaptive_lr/dtype.h"
#include "adaptive_lr/math.h"

namespace adaptive_lr::cpu {

// Elements per chunk of the chunk table: the unit of work of a thread (64K floats = 256 KiB per
// stream, enough to amortize the per-chunk setup while balancing the threads).
constexpr int32_t kChunkSize = 1 << 16;

// One tensor of a bucket: all arrays contiguous with the param's number of elements.
template <class Kernel>
struct TensorPtrs {
  void* param;  // DType
  const void* grad;  // DType
  void* gain;      // float32, or bfloat16 for compact state
  void* grad_sum;  // as gain
  void* grad_sq_sum;  // as gain; null unless the sign test reads it (math.h, kKeepsGradSqSum)
  int8_t* prev_sign;
  // its states, in order: double for float64 params, else float (bfloat16 for kBfloat16)
  void* state[Kernel::kMaxStates];
};

template <class Kernel>
struct Bucket {
  DType dtype;
  Boundary boundary;
  bool boundary_only;  // found_inf: the boundary is applied, nothing else
  StatePrecision precision;  // kCompact: bfloat16 gain and grad_sum; kBfloat16: moments too
  CommonHyper common;
  typename Kernel::Hyper hyper;
  const TensorPtrs<Kernel>* tensors;
  const typename Kernel::Scalars* scalars;  // per tensor, from its step after the increment
  const double* sign_test_factors;  // per tensor, from its step before the increment
  const uint32_t* rounding_keys;  // per tensor, compact state only: rounding_key(seed, step)
  const Chunk* chunks;
  int64_t num_chunks;
  int64_t numel;  // all tensors together
};

// The SIMD build the kernels run ("DEFAULT", "AVX2" or "AVX512"): ATen's choice, lowered to what
// this CPU can execute (csrc/cpu/fused_step.cpp).
std::string kernel_capability();

// One step of a whole bucket: every chunk of every tensor, in parallel (csrc/cpu/fused_step.cpp).
template <class Kernel>
void step(const Bucket<Kernel>& bucket);

// run(begin, end) over chunks [begin, end) of a chunk table of `numel` elements, one share of
// the elements per thread (chunks.h's share_bounds); all on the calling thread below 2^15
// elements, where waking the others costs more than they save.
void parallel_over_shares(const Chunk* chunks, int64_t num_chunks, int64_t numel,
                          const std::function<void(int64_t, int64_t)>& run);

// The kernels, compiled once per CPU capability into namespaces DEFAULT, AVX2 and AVX512
// (csrc/cpu/fused_step_kernel.cpp); each processes chunks [begin, end) of the bucket.
#define ADAPTIVE_LR_DECLARE_CPU_KERNELS(CAPABILITY)                                   \
  namespace CAPABILITY {                                                              \
  template <class Kernel>                                                             \
  void step_chunks(const Bucket<Kernel>& bucket, int64_t begin, int64_t end);         \
  }
ADAPTIVE_LR_DECLARE_CPU_KERNELS(DEFAULT)
ADAPTIVE_LR_DECLARE_CPU_KERNELS(AVX2)
ADAPTIVE_LR_DECLARE_CPU_KERNELS(AVX512)
#undef ADAPTIVE_LR_DECLARE_CPU_KERNELS

}  // namespace adaptive_lr::cpu
