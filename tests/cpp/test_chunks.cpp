// The multi-tensor chunk table (chunks.h).
#include <cstdint>
#include <vector>

#include "adaptive_lr/chunks.h"
#include "check.h"

using adaptive_lr::Chunk;
using adaptive_lr::make_chunks;
using adaptive_lr::share_bounds;

namespace {

bool same(const Chunk& c, int64_t offset, int32_t tensor, int32_t length) {
  return c.offset == offset && c.tensor == tensor && c.length == length;
}

void test_sizes_around_one_chunk() {
  // empty, smaller than, equal to, just over one chunk, empty again, several chunks
  const std::vector<int64_t> numels = {0, 3, 4, 5, 0, 9};
  const std::vector<Chunk> chunks = make_chunks(numels.data(), 6, 4);
  CHECK(chunks.size() == 7);
  CHECK(same(chunks[0], 0, 1, 3));
  CHECK(same(chunks[1], 0, 2, 4));
  CHECK(same(chunks[2], 0, 3, 4));
  CHECK(same(chunks[3], 4, 3, 1));
  CHECK(same(chunks[4], 0, 5, 4));
  CHECK(same(chunks[5], 4, 5, 4));
  CHECK(same(chunks[6], 8, 5, 1));
}

void test_no_tensors_or_only_empty_ones() {
  const std::vector<int64_t> empty = {0, 0};
  CHECK(make_chunks(empty.data(), 2, 4).empty());
  CHECK(make_chunks(nullptr, 0, 4).empty());
}

void test_offsets_past_2_to_the_31() {
  // 3 * 2^31 + 5 elements in chunks of 2^30: offsets are 64-bit (no such tensor is allocated)
  const int64_t big = 3 * (int64_t{1} << 31) + 5;
  const std::vector<int64_t> numels = {big, 2};
  const std::vector<Chunk> chunks = make_chunks(numels.data(), 2, 1 << 30);
  CHECK(chunks.size() == 8);
  for (int k = 0; k < 6; ++k) CHECK(same(chunks[k], int64_t{k} << 30, 0, 1 << 30));
  CHECK(same(chunks[6], int64_t{6} << 30, 0, 5));
  CHECK(chunks[6].offset == 6442450944);
  CHECK(same(chunks[7], 0, 1, 2));
}

void test_lengths_cover_every_element_once() {
  const std::vector<int64_t> numels = {1, 15, 17, 65537, 0, 300};
  const std::vector<Chunk> chunks = make_chunks(numels.data(), 6, 16);
  std::vector<int64_t> covered(numels.size(), 0);
  for (const Chunk& c : chunks) {
    CHECK(c.offset == covered[c.tensor]);  // in order, without gaps
    covered[c.tensor] += c.length;
  }
  CHECK(covered == numels);
}

// Each share's chunks hold about numel / shares elements (within a chunk), where equal counts
// of chunks would not: many short tails first (a model's small tensors), then full chunks.
void test_shares_split_elements_not_chunks() {
  std::vector<int64_t> numels(40, 3);
  numels.push_back(16 * 20);
  const std::vector<Chunk> chunks = make_chunks(numels.data(), 41, 16);  // 40 tails, 20 full
  const int64_t numel = 40 * 3 + 16 * 20;
  for (int64_t shares : {1, 2, 3, 7}) {
    const std::vector<int64_t> bounds = share_bounds(chunks.data(), 60, numel, shares);
    CHECK(bounds.size() == static_cast<size_t>(shares + 1));
    CHECK(bounds.front() == 0 && bounds.back() == 60);
    for (int64_t s = 0; s < shares; ++s) {
      CHECK(bounds[s] <= bounds[s + 1]);
      int64_t elements = 0;
      for (int64_t c = bounds[s]; c < bounds[s + 1]; ++c) elements += chunks[c].length;
      CHECK(elements <= numel / shares + 16 && elements >= numel / shares - 16);
    }
  }
  // two shares: the second starts at the first chunk at or after element 220, after the 40
  // tails and 7 full chunks (120 + 7 * 16 = 232); 30 chunks each would be 90 against 350 elements
  CHECK(share_bounds(chunks.data(), 60, numel, 2)[1] == 47);
}

void test_more_shares_than_chunks_leave_some_empty() {
  const std::vector<int64_t> numels = {5, 5};
  const std::vector<Chunk> chunks = make_chunks(numels.data(), 2, 16);
  CHECK((share_bounds(chunks.data(), 2, 10, 4) == std::vector<int64_t>{0, 1, 1, 2, 2}));
  CHECK((share_bounds(nullptr, 0, 0, 3) == std::vector<int64_t>{0, 0, 0, 0}));
}

}  // namespace

int main() {
  test_sizes_around_one_chunk();
  test_no_tensors_or_only_empty_ones();
  test_offsets_past_2_to_the_31();
  test_lengths_cover_every_element_once();
  test_shares_split_elements_not_chunks();
  test_more_shares_than_chunks_leave_some_empty();
  return report("test_chunks");
}
