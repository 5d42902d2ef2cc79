// Host emulation of the CUDA runtime subset the kernels in csrc/cuda use, for tests only
// (tests/cuda_host/test_cuda_host.cpp): with tests/cuda_host/include first on the include path,
// the kernels' own `#include <cuda_runtime.h>` / <cuda_bf16.h> / <cuda_fp16.h> resolve to the
// stand-ins there, which include this file, and the UNCHANGED kernel source compiles with the
// host C++ compiler. No CUDA toolkit is needed.
//
// Execution model of a launch (cuda_host::launch, which multi_tensor_apply.cuh calls in place of
// its <<<>>> when ADAPTIVE_LR_CUDA_HOST_EMULATION is defined):
//  * the blocks of a launch run one at a time, in a shuffled order (a seeded std::mt19937, so a
//    failure reproduces), which exercises the "last arriving block" logic of the step counters in
//    every order, but never two blocks at once (__shared__ is a function-local static, so one
//    block's shared memory at a time);
//  * the blockDim.x threads of a block are real std::threads (a persistent pool), so code before
//    and after a __syncthreads() runs concurrently across threads, and __syncthreads() is a real
//    barrier among the block's live threads (a thread that returns leaves it);
//  * atomicAdd is a real atomic, __threadfence a sequentially consistent fence.
// What it cannot show: warp-level timing, the device's memory ordering and caches, occupancy and
// register use, and the device's own bf16/fp16 conversion instructions (docs/cuda.md).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

// ---- qualifiers and builtins -------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// one block runs at a time: a function-local static is that block's shared variable
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- runtime API -------------------------------------------------------------------------------

using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

namespace cuda_host {
inline cudaError_t last_error = cudaSuccess;  // the host thread that launches is the only writer
}  // namespace cuda_host

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_host::last_error;
  cuda_host::last_error = cudaSuccess;
  return e;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline int atomicAdd(int* address, int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

void __syncthreads();

// ---- the launcher ------------------------------------------------------------------------------

namespace cuda_host {

// blockDim.x persistent threads; run_block(b, f) runs f on all of them as block b and returns
// when every thread has returned. Waits are futex-based (std::atomic::wait): a block costs two
// wake-ups of each thread (its start and the barrier), no contended lock.
class BlockPool {
 public:
  explicit BlockPool(unsigned threads) : n_(threads) {
    for (unsigned t = 0; t < n_; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~BlockPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (std::thread& w : workers_) w.join();
  }
  unsigned size() const { return n_; }

  void run_block(dim3 grid, unsigned block, const std::function<void()>& f) {
    job_ = &f;
    grid_ = grid;
    block_ = block;
    live_ = n_;
    arrived_ = 0;
    running_.store(n_);
    generation_.fetch_add(1);  // publishes the fields above to the threads
    generation_.notify_all();
    for (unsigned r = running_.load(); r != 0; r = running_.load()) running_.wait(r);
  }

  // __syncthreads(): every live thread of the block arrives before any leaves
  void barrier() {
    uint32_t phase;
    {
      const std::lock_guard<std::mutex> lock(m_);
      phase = phase_.load();
      if (++arrived_ == live_) {
        release_barrier();
        return;
      }
    }
    while (phase_.load() == phase) phase_.wait(phase);
  }

 private:
  void release_barrier() {  // under m_
    arrived_ = 0;
    phase_.fetch_add(1);
    phase_.notify_all();
  }

  void work(unsigned t) {
    uint32_t seen = 0;
    for (;;) {
      while (generation_.load() == seen) generation_.wait(seen);
      seen = generation_.load();
      if (stop_.load()) return;
      threadIdx = uint3{t, 0, 0};
      blockIdx = uint3{block_, 0, 0};
      blockDim = dim3{n_, 1, 1};
      gridDim = grid_;
      (*job_)();
      {
        // a returned thread leaves the barrier; the others may now be complete
        const std::lock_guard<std::mutex> lock(m_);
        --live_;
        if (arrived_ > 0 && arrived_ == live_) release_barrier();
      }
      if (running_.fetch_sub(1) == 1) running_.notify_all();
    }
  }

  const unsigned n_;
  std::vector<std::thread> workers_;
  std::mutex m_;  // live_ and arrived_
  const std::function<void()>* job_ = nullptr;
  dim3 grid_;
  unsigned block_ = 0;
  unsigned live_ = 0, arrived_ = 0;
  std::atomic<uint32_t> generation_{0}, phase_{0}, running_{0};
  std::atomic<bool> stop_{false};
};

inline thread_local BlockPool* current_pool = nullptr;  // set in the pool's threads

struct Launcher {
  std::unique_ptr<BlockPool> pool;
  std::mt19937 rng{20251206};  // reseed to reproduce a failing order
  uint64_t launches = 0;
  uint64_t blocks = 0;
  bool shuffle = true;
};

inline Launcher& launcher() {
  static Launcher l;
  return l;
}

// kernel<<<grid, threads, 0, stream>>>(args...), run on the host as described at the top.
template <class... Params, class... Args>
void launch(unsigned grid, unsigned threads, cudaStream_t, void (*kernel)(Params...),
            const Args&... args) {
  if (grid == 0 || threads == 0 || threads > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  Launcher& l = launcher();
  if (!l.pool || l.pool->size() != threads) l.pool = std::make_unique<BlockPool>(threads);
  std::vector<unsigned> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  if (l.shuffle) std::shuffle(order.begin(), order.end(), l.rng);
  BlockPool* const pool = l.pool.get();
  // every thread gets its own copy of the arguments, as a kernel parameter is read-only
  const std::function<void()> body = [&] {
    current_pool = pool;
    kernel(args...);
  };
  for (unsigned b : order) pool->run_block(dim3{grid, 1, 1}, b, body);
  ++l.launches;
  l.blocks += grid;
}

}  // namespace cuda_host

inline void __syncthreads() { cuda_host::current_pool->barrier(); }

// ---- bfloat16 and half (cuda_bf16.h / cuda_fp16.h): what the kernels use -----------------------
// Storage structs and the round-to-nearest-even conversions of the toolkit's host code paths
// (bit-identical to CUDA 13.0's cuda_fp16.h / cuda_bf16.h compiled by g++, NaNs included, on every
// half and bfloat16 and on every 257th float: checked once by hand, not by ctest, which needs no
// toolkit).

struct __nv_bfloat16 {
  unsigned short __x;
};
struct __half {
  unsigned short __x;
};

namespace cuda_host {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace cuda_host

inline float __bfloat162float(__nv_bfloat16 h) {
  return cuda_host::bits_float(static_cast<uint32_t>(h.__x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = cuda_host::float_bits(f);
  if ((u & 0x7fffffffU) > 0x7f800000U) return {0x7fffU};  // NaN: the toolkit's canonical NaN
  const uint32_t rounded = u + 0x7fffU + ((u >> 16) & 1U);  // ties to even; overflows to inf
  return {static_cast<unsigned short>(rounded >> 16)};
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000U) << 16;
  const uint32_t exponent = (h.__x >> 10) & 0x1fU, mantissa = h.__x & 0x3ffU;
  if (exponent == 0x1f) {  // inf keeps its sign; NaN: the toolkit's host code's canonical NaN
    return cuda_host::bits_float(mantissa == 0 ? sign | 0x7f800000U : 0x7fffffffU);
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return cuda_host::bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = cuda_host::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000U;
  const uint32_t a = u & 0x7fffffffU;
  if (a > 0x7f800000U) return {static_cast<unsigned short>(0x7fffU)};  // NaN: canonical
  if (a >= 0x477ff000U) {  // >= 65520 (halfway above the largest half, 65504): inf
    return {static_cast<unsigned short>(sign | 0x7c00U)};
  }
  if (a < 0x38800000U) {  // below 2^-14: a subnormal half (or zero), in units of 2^-24
    // |f| * 2^24 rounded to an integer, ties to even: exact by the float unit's own rounding
    // (adding and subtracting 2^23 rounds a value below 2^23 to an integer in the current mode,
    // round to nearest even)
    const float scaled = cuda_host::bits_float(a) * 0x1p24f;  // exact: a power-of-two scale
    volatile float big = scaled + 0x1p23f;
    const float rounded = big - 0x1p23f;
    return {static_cast<unsigned short>(sign | static_cast<uint32_t>(rounded))};
  }
  // normal: rebias the exponent (127 -> 15) and round 13 mantissa bits away, ties to even; a
  // carry into the exponent is the right result (up to 0x7bff + 1 = inf, excluded above)
  const uint32_t rebased = a - 0x38000000U;  // exponent - 112
  const uint32_t rounded = rebased + 0xfffU + ((rebased >> 13) & 1U);
  return {static_cast<unsigned short>(sign | (rounded >> 13))};
}
