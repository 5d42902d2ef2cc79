// How a bucket's chunk table is cut into kernel launches whose metadata is a kernel argument (the
// multi-tensor-apply pattern of PyTorch's MultiTensorApply.cuh and Apex): a launch holds at most
// `max_tensors` tensor slots (their addresses) and `max_blocks` blocks (one chunk each). The CUDA
// launcher only walks this plan; the plan itself is host-only and torch-free, so it is unit-tested
// on the CPU (tests/cpp/test_launch_plan.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "adaptive_lr/chunks.h"

namespace adaptive_lr {

struct LaunchLimits {
  int32_t max_tensors;  // tensor slots per launch
  int32_t max_blocks;   // blocks (chunks) per launch
};

// One tensor's part of a launch.
struct TensorSlot {
  int32_t tensor;   // index in the bucket
  int32_t blocks;   // blocks of this launch that work on it
  bool finishes;    // its last chunk is in this launch: its step counter advances in this launch
};

// One block: chunk `chunk` (element offset chunk * chunk_size) of the tensor in slot `slot`.
struct BlockTask {
  int32_t slot;
  int32_t chunk;
};

struct Launch {
  std::vector<TensorSlot> slots;
  std::vector<BlockTask> blocks;
};

// The launches that step tensors with the given element counts, in tensor and chunk order.
//  * A launch is closed when its block slots are full, or when the next tensor needs a slot and
//    the tensor slots are full.
//  * A tensor whose chunks do not fit continues in the next launch (its slot there is slot 0);
//    only the launch holding its last chunk `finishes` it. Launches on one stream run in order, so
//    that launch may advance the step counter once its own blocks have read it.
//  * An empty tensor gets one block with no elements: its step counter advances like any other's.
inline std::vector<Launch> plan_launches(const int64_t* numels, int32_t num_tensors,
                                         int32_t chunk_size, LaunchLimits limits) {
  std::vector<Launch> launches;
  const auto add_block = [&](int32_t tensor, int32_t chunk) {
    const bool new_launch =
        launches.empty() ||
        static_cast<int32_t>(launches.back().blocks.size()) == limits.max_blocks ||
        (launches.back().slots.back().tensor != tensor &&
         static_cast<int32_t>(launches.back().slots.size()) == limits.max_tensors);
    if (new_launch) launches.emplace_back();
    Launch& launch = launches.back();
    if (launch.slots.empty() || launch.slots.back().tensor != tensor) {
      launch.slots.push_back({tensor, 0, false});
    }
    launch.slots.back().blocks += 1;
    launch.blocks.push_back({static_cast<int32_t>(launch.slots.size()) - 1, chunk});
  };

  const std::vector<Chunk> chunks = make_chunks(numels, num_tensors, chunk_size);
  std::size_t c = 0;
  for (int32_t t = 0; t < num_tensors; ++t) {
    if (numels[t] == 0) add_block(t, 0);
    for (; c < chunks.size() && chunks[c].tensor == t; ++c) {
      add_block(t, static_cast<int32_t>(chunks[c].offset / chunk_size));
    }
    launches.back().slots.back().finishes = true;
  }
  return launches;
}

}  // namespace adaptive_lr
