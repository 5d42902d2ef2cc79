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

constexpr int kMaxTensors = kLaunchLimits.max_tensors;
constexpr int kMaxBlocks = kLaunchLimits.max_blocks;
static_assert(kMaxTensors <= 256, "block_slot is a uint8_t");

// One launch's view of its tensors and blocks.
struct LaunchMetadata {
  void* addresses[kNumLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  // for a tensor whose last chunk is in this launch: its blocks in this launch; 0 for a tensor
  // that continues in the next launch (that launch advances its step counter)
  int32_t finishing_blocks[kMaxTensors];
  uint8_t block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];  // element offset = block_chunk * kChunkSize (64-bit)
};

// Kernel arguments: 4 KB was the limit before CUDA 12.1 (32 KB since, on Volta and newer); staying
// within it keeps the arguments every launch (and every graph node) copies small.
constexpr std::size_t kMaxKernelArgBytes = 4096;

template <class Functor, class Args>
__global__ void __launch_bounds__(Functor::kThreads)
    multi_tensor_apply_kernel(const __grid_constant__ LaunchMetadata meta,
                              const __grid_constant__ Args args) {
  Functor::block(meta, args);
}

// Enqueues the launches of `plan` on `stream`; returns the first launch error.
template <class Functor, class Args>
cudaError_t multi_tensor_apply(const std::vector<Launch>& plan, const TensorAddresses* tensors,
                               const int64_t* numels, const Args& args, cudaStream_t stream) {
  static_assert(sizeof(LaunchMetadata) + sizeof(Args) <= kMaxKernelArgBytes,
                "kernel arguments exceed 4 KB: lower kLaunchLimits");
  for (const Launch& launch : plan) {
    LaunchMetadata meta{};
    for (std::size_t s = 0; s < launch.slots.size(); ++s) {
      const TensorSlot& slot = launch.slots[s];
      for (int list = 0; list < kNumLists; ++list) {
        meta.addresses[list][s] = tensors[slot.tensor][list];
      }
      meta.numels[s] = numels[slot.tensor];
      meta.finishing_blocks[s] = slot.finishes ? slot.blocks : 0;
    }
    for (std::size_t b = 0; b < launch.blocks.size(); ++b) {
      meta.block_slot[b] = static_cast<uint8_t>(launch.blocks[b].slot);
      meta.block_chunk[b] = launch.blocks[b].chunk;
    }
    multi_tensor_apply_kernel<Functor, Args>
        <<<static_cast<unsigned>(launch.blocks.size()), Functor::kThreads, 0, stream>>>(meta,
                                                                                       args);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace adaptive_lr::cuda
