// The CPU launcher: picks the kernel build for this machine's SIMD capability and runs it over the
// chunk table with at::parallel_for (OpenMP; this file is compiled and linked with -fopenmp).
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include "fused_step.h"

namespace adaptive_lr::cpu {
namespace {

// Below this many elements a step is cheaper on one thread than waking the others.
constexpr int64_t kMinParallelNumel = 1 << 15;

template <class Kernel>
using KernelFn = void (*)(const Bucket<Kernel>&, int64_t, int64_t);

template <class Kernel>
KernelFn<Kernel> pick_kernel() {
#if defined(CPU_CAPABILITY)
  // the just-in-time build (adaptive_lr/backends/extension.py) compiles every file for the one
  // capability it found runnable on this machine
  return &CPU_CAPABILITY::step_chunks<Kernel>;
#else
#if defined(ADAPTIVE_LR_CPU_X86)
  const std::string capability = kernel_capability();
  if (capability == "AVX512") return &AVX512::step_chunks<Kernel>;
  if (capability == "AVX2") return &AVX2::step_chunks<Kernel>;
#endif
  return &DEFAULT::step_chunks<Kernel>;
#endif
}

}  // namespace

std::string kernel_capability() {
#if defined(CPU_CAPABILITY)
  return C10_STRINGIZE(CPU_CAPABILITY);
#else
  // ATen's own choice (cpuinfo, overridable with ATEN_CPU_CAPABILITY=default|avx2|avx512), so the
  // kernels use the same SIMD width as torch's and can be tested at each width. ATen believes the
  // variable without asking the CPU: lowered here to what the CPU runs, or it dies of SIGILL.
  std::string capability = at::get_cpu_capability();
#if defined(ADAPTIVE_LR_CPU_X86)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  std::string runnable = capability;
  if (runnable == "AVX512" && !avx512) runnable = "AVX2";
  if (runnable == "AVX2" && !avx2) runnable = "DEFAULT";
  if (runnable != capability) {
    TORCH_WARN_ONCE("adaptive_lr: torch chose ", capability, " (ATEN_CPU_CAPABILITY?) but this CPU "
                    "cannot run it; the fused CPU kernels run ", runnable);
  }
  return runnable;
#else
  return "DEFAULT";
#endif
#endif
}

void parallel_over_shares(const Chunk* chunks, int64_t num_chunks, int64_t numel,
                          const std::function<void(int64_t, int64_t)>& run) {
  const int64_t threads = numel < kMinParallelNumel ? 1 : at::get_num_threads();
  if (threads == 1) {
    run(0, num_chunks);
    return;
  }
  const std::vector<int64_t> bounds = share_bounds(chunks, num_chunks, numel, threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) run(bounds[s], bounds[s + 1]);
  });
}

template <class Kernel>
void step(const Bucket<Kernel>& bucket) {
  static const KernelFn<Kernel> kernel = pick_kernel<Kernel>();
  parallel_over_shares(bucket.chunks, bucket.num_chunks, bucket.numel,
                       [&](int64_t begin, int64_t end) { kernel(bucket, begin, end); });
}

#define ADAPTIVE_LR_INSTANTIATE(name, Kernel) template void step<Kernel>(const Bucket<Kernel>&);
ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_INSTANTIATE)
#undef ADAPTIVE_LR_INSTANTIATE

}  // namespace adaptive_lr::cpu
