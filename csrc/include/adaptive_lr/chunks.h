// The multi-tensor chunk table: every tensor of a bucket cut into fixed-size chunks, so that one
// parallel loop (CPU threads, or CUDA blocks) covers all tensors with evenly sized work items.
// Torch-free and host-only; the CPU and CUDA launchers share it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace adaptive_lr {

struct Chunk {
  int64_t offset;  // first element of the chunk within its tensor (64-bit: tensors may exceed 2^31)
  int32_t tensor;  // index of the tensor in the bucket's lists
  int32_t length;  // elements in the chunk, 1..chunk_size
};

// Chunks of tensors with the given element counts, in tensor order; empty tensors contribute none.
inline std::vector<Chunk> make_chunks(const int64_t* numels, int32_t num_tensors,
                                      int32_t chunk_size) {
  int64_t total = 0;
  for (int32_t t = 0; t < num_tensors; ++t) total += (numels[t] + chunk_size - 1) / chunk_size;
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<std::size_t>(total));
  for (int32_t t = 0; t < num_tensors; ++t) {
    for (int64_t offset = 0; offset < numels[t]; offset += chunk_size) {
      const int64_t left = numels[t] - offset;
      chunks.push_back({offset, t, static_cast<int32_t>(left < chunk_size ? left : chunk_size)});
    }
  }
  return chunks;
}

// The chunk ranges of `shares` threads that each get about numel / shares elements: share s runs
// chunks [bounds[s], bounds[s + 1]), its first chunk the first that starts at or after element
// s * numel / shares. An equal count of chunks per thread is not an equal count of elements: a
// model's small tensors are one short chunk each, and ResNet-50's 508 chunks (of 2^16) split in
// halves of 10.2M and 15.4M elements.
inline std::vector<int64_t> share_bounds(const Chunk* chunks, int64_t num_chunks, int64_t numel,
                                         int64_t shares) {
  std::vector<int64_t> bounds(static_cast<std::size_t>(shares + 1), num_chunks);
  bounds[0] = 0;
  int64_t start = 0;  // elements before chunk c
  int64_t s = 1;
  for (int64_t c = 0; c < num_chunks && s < shares; ++c) {
    while (s < shares && start >= numel * s / shares) {
      bounds[static_cast<std::size_t>(s++)] = c;
    }
    start += chunks[c].length;
  }
  return bounds;
}

}  // namespace adaptive_lr
