// The CUDA launcher's host-side planning (launch_plan.h): which launches, what splits, what
// carries over.
#include <cstdint>
#include <vector>

#include "adaptive_lr/launch_plan.h"
#include "check.h"

using adaptive_lr::BlockTask;
using adaptive_lr::Launch;
using adaptive_lr::LaunchLimits;
using adaptive_lr::plan_launches;
using adaptive_lr::TensorSlot;

namespace {

bool same_slot(const TensorSlot& s, int32_t tensor, int32_t blocks, bool finishes) {
  return s.tensor == tensor && s.blocks == blocks && s.finishes == finishes;
}

bool same_block(const BlockTask& b, int32_t slot, int32_t chunk) {
  return b.slot == slot && b.chunk == chunk;
}

// Properties every plan has: each chunk of each tensor is in exactly one block, in order; each
// tensor (empty ones too) finishes exactly once, in the last launch that holds it; limits hold;
// a slot's block count is its number of blocks.
void check_invariants(const std::vector<Launch>& plan, const std::vector<int64_t>& numels,
                      int32_t chunk_size, LaunchLimits limits) {
  std::vector<int64_t> next_chunk(numels.size(), 0);
  std::vector<int> finished(numels.size(), 0);
  std::vector<int> last_launch(numels.size(), -1);
  for (std::size_t l = 0; l < plan.size(); ++l) {
    const Launch& launch = plan[l];
    CHECK(!launch.blocks.empty());
    CHECK(static_cast<int32_t>(launch.blocks.size()) <= limits.max_blocks);
    CHECK(static_cast<int32_t>(launch.slots.size()) <= limits.max_tensors);
    std::vector<int32_t> blocks_per_slot(launch.slots.size(), 0);
    for (const BlockTask& b : launch.blocks) {
      CHECK(b.slot >= 0 && b.slot < static_cast<int32_t>(launch.slots.size()));
      const int32_t t = launch.slots[b.slot].tensor;
      CHECK(b.chunk == next_chunk[t]);
      ++next_chunk[t];
      ++blocks_per_slot[b.slot];
    }
    for (std::size_t s = 0; s < launch.slots.size(); ++s) {
      const TensorSlot& slot = launch.slots[s];
      CHECK(slot.blocks == blocks_per_slot[s]);
      finished[slot.tensor] += slot.finishes;
      last_launch[slot.tensor] = static_cast<int>(l);
    }
  }
  for (std::size_t t = 0; t < numels.size(); ++t) {
    const int64_t chunks = numels[t] == 0 ? 1 : (numels[t] + chunk_size - 1) / chunk_size;
    CHECK(next_chunk[t] == chunks);
    CHECK(finished[t] == 1);
  }
  // a tensor finishes in the last launch that holds it
  for (std::size_t l = 0; l < plan.size(); ++l) {
    for (const TensorSlot& slot : plan[l].slots) {
      CHECK(slot.finishes == (last_launch[slot.tensor] == static_cast<int>(l)));
    }
  }
}

void test_small_bucket_is_one_launch() {
  const std::vector<int64_t> numels = {3, 4, 5};
  const LaunchLimits limits{8, 16};
  const std::vector<Launch> plan = plan_launches(numels.data(), 3, 4, limits);
  CHECK(plan.size() == 1);
  CHECK(plan[0].slots.size() == 3);
  CHECK(same_slot(plan[0].slots[0], 0, 1, true));
  CHECK(same_slot(plan[0].slots[1], 1, 1, true));
  CHECK(same_slot(plan[0].slots[2], 2, 2, true));
  CHECK(plan[0].blocks.size() == 4);
  CHECK(same_block(plan[0].blocks[2], 2, 0));
  CHECK(same_block(plan[0].blocks[3], 2, 1));
  check_invariants(plan, numels, 4, limits);
}

void test_full_block_slots_split_a_tensor_into_the_next_launch() {
  // 5 chunks, 3 blocks per launch: chunks 0-2, then 3-4 carried into launch 2 as its slot 0
  const std::vector<int64_t> numels = {17, 2};
  const LaunchLimits limits{8, 3};
  const std::vector<Launch> plan = plan_launches(numels.data(), 2, 4, limits);
  CHECK(plan.size() == 2);
  CHECK(plan[0].slots.size() == 1);
  CHECK(same_slot(plan[0].slots[0], 0, 3, false));
  CHECK(same_block(plan[0].blocks[0], 0, 0));
  CHECK(same_block(plan[0].blocks[2], 0, 2));
  CHECK(plan[1].slots.size() == 2);
  CHECK(same_slot(plan[1].slots[0], 0, 2, true));
  CHECK(same_slot(plan[1].slots[1], 1, 1, true));
  CHECK(same_block(plan[1].blocks[0], 0, 3));
  CHECK(same_block(plan[1].blocks[1], 0, 4));
  CHECK(same_block(plan[1].blocks[2], 1, 0));
  check_invariants(plan, numels, 4, limits);
}

void test_full_tensor_slots_start_a_new_launch() {
  const std::vector<int64_t> numels = {1, 1, 1, 1, 1};
  const LaunchLimits limits{2, 100};
  const std::vector<Launch> plan = plan_launches(numels.data(), 5, 4, limits);
  CHECK(plan.size() == 3);
  CHECK(plan[0].slots.size() == 2 && plan[1].slots.size() == 2 && plan[2].slots.size() == 1);
  CHECK(same_slot(plan[2].slots[0], 4, 1, true));
  check_invariants(plan, numels, 4, limits);
}

void test_a_tensor_ending_at_a_full_launch_is_not_carried() {
  // tensor 0 fills the 2 blocks exactly: it finishes there, launch 2 starts with tensor 1
  const std::vector<int64_t> numels = {8, 3};
  const LaunchLimits limits{4, 2};
  const std::vector<Launch> plan = plan_launches(numels.data(), 2, 4, limits);
  CHECK(plan.size() == 2);
  CHECK(plan[0].slots.size() == 1 && same_slot(plan[0].slots[0], 0, 2, true));
  CHECK(plan[1].slots.size() == 1 && same_slot(plan[1].slots[0], 1, 1, true));
  check_invariants(plan, numels, 4, limits);
}

void test_a_tensor_spanning_several_launches() {
  // 10 chunks, 3 blocks per launch: 3 + 3 + 3 + 1, finished only by the 4th launch
  const std::vector<int64_t> numels = {40};
  const LaunchLimits limits{4, 3};
  const std::vector<Launch> plan = plan_launches(numels.data(), 1, 4, limits);
  CHECK(plan.size() == 4);
  for (int l = 0; l < 3; ++l) CHECK(same_slot(plan[l].slots[0], 0, 3, false));
  CHECK(same_slot(plan[3].slots[0], 0, 1, true));
  CHECK(same_block(plan[3].blocks[0], 0, 9));
  check_invariants(plan, numels, 4, limits);
}

void test_empty_tensors_get_one_block_without_elements() {
  const std::vector<int64_t> numels = {0, 5, 0};
  const LaunchLimits limits{8, 16};
  const std::vector<Launch> plan = plan_launches(numels.data(), 3, 4, limits);
  CHECK(plan.size() == 1);
  CHECK(same_slot(plan[0].slots[0], 0, 1, true));
  CHECK(same_slot(plan[0].slots[2], 2, 1, true));
  CHECK(same_block(plan[0].blocks[0], 0, 0));
  CHECK(same_block(plan[0].blocks[3], 2, 0));
  check_invariants(plan, numels, 4, limits);
}

void test_chunk_indices_past_2_to_the_31_elements() {
  // 3 * 2^31 + 5 elements in chunks of 2^16: chunk indices stay int32, offsets need 64 bits
  const int64_t big = 3 * (int64_t{1} << 31) + 5;
  const std::vector<int64_t> numels = {big};
  const LaunchLimits limits{24, 320};
  const std::vector<Launch> plan = plan_launches(numels.data(), 1, 1 << 16, limits);
  const int64_t chunks = 3 * (int64_t{1} << 15) + 1;
  CHECK(static_cast<int64_t>(plan.size()) == (chunks + 319) / 320);
  const BlockTask& last = plan.back().blocks.back();
  CHECK(last.chunk == chunks - 1);
  CHECK(int64_t{last.chunk} * (1 << 16) == 3 * (int64_t{1} << 31));
  check_invariants(plan, numels, 1 << 16, limits);
}

void test_many_mixed_tensors_keep_every_invariant() {
  std::vector<int64_t> numels;
  for (int i = 0; i < 300; ++i) numels.push_back((i * 7919) % 41 == 0 ? 0 : (i * 7919) % 97);
  for (const LaunchLimits limits :
       {LaunchLimits{1, 1}, LaunchLimits{3, 5}, LaunchLimits{24, 320}}) {
    const std::vector<Launch> plan =
        plan_launches(numels.data(), static_cast<int32_t>(numels.size()), 8, limits);
    check_invariants(plan, numels, 8, limits);
  }
}

void test_no_tensors_no_launches() { CHECK(plan_launches(nullptr, 0, 4, {4, 4}).empty()); }

}  // namespace

int main() {
  test_small_bucket_is_one_launch();
  test_full_block_slots_split_a_tensor_into_the_next_launch();
  test_full_tensor_slots_start_a_new_launch();
  test_a_tensor_ending_at_a_full_launch_is_not_carried();
  test_a_tensor_spanning_several_launches();
  test_empty_tensors_get_one_block_without_elements();
  test_chunk_indices_past_2_to_the_31_elements();
  test_many_mixed_tensors_keep_every_invariant();
  test_no_tensors_no_launches();
  return report("test_launch_plan");
}
