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

#include "adaptive_lr/launch_plan.h"
#include "adaptive_lr/math.h"

namespace adaptive_lr::cuda {

// The lists of a bucket, in the order of the per-tensor address table.
enum List : int {
  kParam,     // param dtype
  kGrad,      // param dtype
  kGain,      // float
  kGradSum,   // float
  kPrevSign,  // int8
  kStep,      // float, one element
  kState0,    // the kernel's states in its order (momentum_buffer; exp_avg, exp_avg_sq or
              // exp_avg_var, max_*): double for float64 params, else float
  kNumLists = kState0 + 3,
};
using TensorAddresses = std::array<void*, kNumLists>;

enum class DType { kFloat, kDouble, kBFloat16, kHalf };

// Elements per chunk (one block's work) and the launch limits: metadata for 24 tensors and 320
// blocks keeps a launch's kernel arguments within 4 KB (static_assert in multi_tensor_apply.cuh).
constexpr int32_t kChunkSize = 1 << 16;
constexpr LaunchLimits kLaunchLimits{24, 320};

// Everything the kernel reads besides the tensors, all of it valid while the step runs: the
// scalars that change per step are device pointers, read by the kernel.
template <class Kernel>
struct StepArgs {
  typename Kernel::Hyper hyper;  // its lr is ignored: the kernel reads *lr
  double gain_inc, gain_dec, min_gain, max_gain, weight_decay;
  bool maximize;
  bool lr_is_double;        // *lr is a double, else a float
  const void* lr;           // device
  const float* grad_scale;  // device; null: no grad scaling
  const float* found_inf;   // device; null: never skipped
  // device, kLaunchLimits.max_tensors int32 zeros, the bucket's own: the blocks of a tensor count
  // their arrivals here so that the last one advances the step counter and resets the count to 0
  // (as every launch must find it)
  int32_t* arrivals;
};

template <class Kernel>
struct Bucket {
  DType dtype;
  Boundary boundary;
  StepArgs<Kernel> args;
  const TensorAddresses* tensors;  // host array, one per tensor
  const int64_t* numels;           // host array
  int32_t num_tensors;
};

// One step of a whole bucket, enqueued on `stream` (csrc/cuda/step_*.cu); returns the launch error.
template <class Kernel>
cudaError_t step(const Bucket<Kernel>& bucket, cudaStream_t stream);

extern template cudaError_t step<Sgd>(const Bucket<Sgd>&, cudaStream_t);
extern template cudaError_t step<Adam<false>>(const Bucket<Adam<false>>&, cudaStream_t);
extern template cudaError_t step<Adam<true>>(const Bucket<Adam<true>>&, cudaStream_t);

}  // namespace adaptive_lr::cuda
