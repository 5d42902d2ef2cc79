// The fused CUDA step: what the op glue (csrc/cuda/ops_cuda.cpp) hands the kernels. Torch-free
// (raw pointers, sizes, a cudaStream_t), so the .cu files compile with nvcc alone.
//
// Capturable in a CUDA graph: nothing that changes from step to step is a launch argument except
// the boundary kind. lr, grad_scale, found_inf and every tensor's step counter are read by the
// kernel from device memory, and the step counters are advanced by the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>

#include "adaptive_lr/dtype.h"
#include "adaptive_lr/launch_plan.h"
#include "adaptive_lr/math.h"

namespace adaptive_lr::cuda {

// The lists of a bucket, in the order of the per-tensor address table.
enum List : int {
  kParam,     // param dtype
  kGrad,      // param dtype
  kGain,      // float; bfloat16 bits (uint16_t) for compact state
  kGradSum,   // as kGain
  kPrevSign,  // int8
  kStep,      // float, one element
  kState0,    // the kernel's states in its order (math.h's kStates): double for float64 params,
              // else float
};
// After the states, for a kernel whose sign test reads one (math.h, kKeepsGradSqSum): the epoch's
// sums of g^2, as kGain (null while the test is off).
template <class Kernel>
constexpr int kGradSqSum = kState0 + Kernel::kMaxStates;
// A kernel's lists: the six above, its states and its grad_sq_sum; the address table is sized by
// them.
template <class Kernel>
constexpr int kNumLists = kGradSqSum<Kernel> + (kKeepsGradSqSum<Kernel> ? 1 : 0);
template <class Kernel>
using TensorAddresses = std::array<void*, kNumLists<Kernel>>;

// Elements per chunk (one block's work). A launch's tensor and block limits depend on the
// kernel's metadata size (launch_limits in multi_tensor_apply.cuh); no kernel has more tensor
// slots than this (block_slot is a uint8_t), which is also how many arrival counters a bucket has.
constexpr int32_t kChunkSize = 1 << 16;
constexpr int32_t kMaxTensorSlots = 256;

// Everything the kernel reads besides the tensors, all of it valid while the step runs: the
// scalars that change per step are device pointers, read by the kernel.
template <class Kernel>
struct StepArgs {
  typename Kernel::Hyper hyper;  // its lr is ignored: the kernel reads *lr
  double gain_inc, gain_dec, min_gain, max_gain, sign_threshold;
  bool relax_gains;
  int64_t epoch_steps;
  double weight_decay;
  bool maximize;
  bool lr_is_double;        // *lr is a double, else a float
  const void* lr;           // device
  const float* grad_scale;  // device; null: no grad scaling
  const float* found_inf;   // device; null: never skipped
  // device, kMaxTensorSlots int32 zeros, the bucket's own: the blocks of a tensor count
  // their arrivals here so that the last one advances the step counter and resets the count to 0
  // (as every launch must find it)
  int32_t* arrivals;
};

template <class Kernel>
struct Bucket {
  DType dtype;
  Boundary boundary;
  StatePrecision precision;  // kCompact: bfloat16 gain and grad_sum; kBfloat16: moments too (never
                             // for float64 params)
  StepArgs<Kernel> args;
  const TensorAddresses<Kernel>* tensors;  // host array, one per tensor
  const int64_t* numels;           // host array
  const uint32_t* rounding_seeds;  // host array: compact state's seeds (0 for full state)
  int32_t num_tensors;
};

// One step of a whole bucket, enqueued on `stream` (csrc/cuda/step_kernels.cu); returns the
// launch error.
template <class Kernel>
cudaError_t step(const Bucket<Kernel>& bucket, cudaStream_t stream);

#define ADAPTIVE_LR_DECLARE(name, Kernel) \
  extern template cudaError_t step<Kernel>(const Bucket<Kernel>&, cudaStream_t);
ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_DECLARE)
#undef ADAPTIVE_LR_DECLARE

}  // namespace adaptive_lr::cuda
