// Multi-tensor apply: many tensors stepped by one kernel launch, with the tensors' addresses and
// the block -> (tensor, chunk) map passed as a kernel argument (as PyTorch's
// MultiTensorApply.cuh and Apex's multi_tensor_apply.cuh do): no device table to build, copy or
// keep alive, so a launch is self-contained and can be captured in a CUDA graph as is. A bucket
// that does not fit one launch's metadata is split by the plan of launch_plan.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "adaptive_lr/launch_plan.h"
#include "fused_step.h"

namespace adaptive_lr::cuda {

// Kernel arguments: 4 KB was the limit before CUDA 12.1 (32 KB since, on Volta and newer); staying
// within it keeps the arguments every launch (and every graph node) copies small.
constexpr std::size_t kMaxKernelArgBytes = 4096;
constexpr int32_t kMaxBlocks = 320;

// A launch's limits for a kernel: kMaxBlocks blocks and as many tensor slots as the rest of the
// 4 KB holds beside its StepArgs (the slack covers LaunchMetadata's padding; the static_assert in
// multi_tensor_apply checks the real sizes). E.g. 28 slots with 9 lists, 34 with 7.
template <class Kernel>
constexpr LaunchLimits launch_limits() {
  constexpr std::size_t per_block = sizeof(uint8_t) + sizeof(int32_t);
  constexpr std::size_t per_tensor =
      kNumLists<Kernel> * sizeof(void*) + sizeof(int64_t) + 2 * sizeof(int32_t);
  constexpr std::size_t slack = 16;
  constexpr std::size_t tensors =
      (kMaxKernelArgBytes - sizeof(StepArgs<Kernel>) - kMaxBlocks * per_block - slack) /
      per_tensor;
  return {static_cast<int32_t>(tensors < kMaxTensorSlots ? tensors : kMaxTensorSlots),
          kMaxBlocks};
}

// One launch's view of its tensors and blocks, sized by the kernel's lists and limits.
template <class Kernel>
struct LaunchMetadata {
  static constexpr LaunchLimits kLimits = launch_limits<Kernel>();
  void* addresses[kNumLists<Kernel>][kLimits.max_tensors];
  int64_t numels[kLimits.max_tensors];
  uint32_t rounding_seeds[kLimits.max_tensors];  // compact state's (math.h, rounding_key)
  // for a tensor whose last chunk is in this launch: its blocks in this launch; 0 for a tensor
  // that continues in the next launch (that launch advances its step counter)
  int32_t finishing_blocks[kLimits.max_tensors];
  uint8_t block_slot[kLimits.max_blocks];  // kMaxTensorSlots <= 256
  int32_t block_chunk[kLimits.max_blocks];  // element offset = block_chunk * kChunkSize (64-bit)
};

template <class Functor, class Kernel>
__global__ void __launch_bounds__(Functor::kThreads)
    multi_tensor_apply_kernel(const __grid_constant__ LaunchMetadata<Kernel> meta,
                              const __grid_constant__ StepArgs<Kernel> args) {
  Functor::block(meta, args);
}

// Enqueues the launches of `plan` on `stream`; returns the first launch error.
template <class Functor, class Kernel>
cudaError_t multi_tensor_apply(const std::vector<Launch>& plan,
                               const TensorAddresses<Kernel>* tensors, const int64_t* numels,
                               const uint32_t* rounding_seeds, const StepArgs<Kernel>& args,
                               cudaStream_t stream) {
  static_assert(sizeof(LaunchMetadata<Kernel>) + sizeof(StepArgs<Kernel>) <= kMaxKernelArgBytes,
                "kernel arguments exceed 4 KB: lower kMaxBlocks");
  static_assert(kMaxTensorSlots <= 256, "block_slot is a uint8_t");
  for (const Launch& launch : plan) {
    LaunchMetadata<Kernel> meta{};
    for (std::size_t s = 0; s < launch.slots.size(); ++s) {
      const TensorSlot& slot = launch.slots[s];
      for (int list = 0; list < kNumLists<Kernel>; ++list) {
        meta.addresses[list][s] = tensors[slot.tensor][list];
      }
      meta.numels[s] = numels[slot.tensor];
      meta.rounding_seeds[s] = rounding_seeds[slot.tensor];
      meta.finishing_blocks[s] = slot.finishes ? slot.blocks : 0;
    }
    for (std::size_t b = 0; b < launch.blocks.size(); ++b) {
      meta.block_slot[b] = static_cast<uint8_t>(launch.blocks[b].slot);
      meta.block_chunk[b] = launch.blocks[b].chunk;
    }
#ifdef ADAPTIVE_LR_CUDA_HOST_EMULATION
    // the tests' host emulation (tests/cuda_host) runs the same launch on the CPU
    cuda_host::launch(static_cast<unsigned>(launch.blocks.size()), Functor::kThreads, stream,
                      multi_tensor_apply_kernel<Functor, Kernel>, meta, args);
#else
    multi_tensor_apply_kernel<Functor, Kernel>
        <<<static_cast<unsigned>(launch.blocks.size()), Functor::kThreads, 0, stream>>>(meta,
                                                                                       args);
#endif
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace adaptive_lr::cuda
