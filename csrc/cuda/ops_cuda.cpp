// The torch glue of the CUDA kernels: validation (shared with the CPU ops), the tensors' raw
// pointers, the current stream, and the bucket's arrival counters. Nothing here reads device
// memory or waits for the device: a step is capturable in a CUDA graph.
#include "cuda/ops_cuda.h"

#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>

#include "cuda/fused_step.h"

namespace adaptive_lr::cuda {
namespace {

// The arrival counters of a bucket (StepArgs::arrivals), keyed like its step counters by the
// first tensor's step: a bucket's launches run in stream order and never concurrently with
// another step of the same bucket, and other buckets (other optimizers, other streams) get their
// own. Kept for the life of the process, since a captured CUDA graph holds their address; so they
// must be allocated (and zeroed) by an eager step before any capture.
int32_t* arrivals_for(const at::Tensor& first_step, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* counters = new std::unordered_map<const void*, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counters->find(first_step.const_data_ptr());
  if (it == counters->end()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "adaptive_lr: step this bucket once outside a CUDA graph capture before capturing "
                "it (its arrival counters are allocated by the first step)");
    at::Tensor zeros =
        at::zeros({int64_t{kMaxTensorSlots}}, first_step.options().dtype(at::kInt));
    it = counters->emplace(first_step.const_data_ptr(), std::move(zeros)).first;
  }
  return it->second.data_ptr<int32_t>();
}

}  // namespace

template <class Kernel>
void fused_step(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states,
                const typename Kernel::Hyper& hyper) {
  validate(op, a, states, at::kCUDA);
  const at::Device device = a.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  const size_t n = a.params.size();
  std::vector<TensorAddresses<Kernel>> tensors(n);
  std::vector<int64_t> numels(n);
  const bool compact = is_compact(a);
  std::vector<uint32_t> rounding_seeds(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (compact) rounding_seeds[i] = static_cast<uint32_t>(a.rounding_seeds[i]);
    TensorAddresses<Kernel>& t = tensors[i];
    t = {};  // states the hyperparameters leave unused stay null
    t[kParam] = a.params[i].data_ptr();
    t[kGrad] = const_cast<void*>(a.grads[i].const_data_ptr());  // the kernels only read grads
    t[kGain] = a.gains[i].data_ptr();
    t[kGradSum] = a.grad_sums[i].data_ptr();
    t[kPrevSign] = a.prev_signs[i].data_ptr();
    t[kStep] = a.steps[i].data_ptr();
    for (size_t k = 0; k < states.size(); ++k) t[kState0 + k] = states[k].tensors[i].data_ptr();
    if constexpr (kKeepsGradSqSum<Kernel>) {
      if (!a.grad_sq_sums.empty()) t[kGradSqSum<Kernel>] = a.grad_sq_sums[i].data_ptr();
    }
    numels[i] = a.params[i].numel();
  }
  const StepArgs<Kernel> args{hyper,
                              a.gain_inc,
                              a.gain_dec,
                              a.min_gain,
                              a.max_gain,
                              a.sign_threshold,
                              a.relax_gains,
                              a.epoch_steps,
                              a.weight_decay,
                              a.maximize,
                              a.lr.scalar_type() == at::kDouble,
                              a.lr.const_data_ptr(),
                              a.grad_scale ? a.grad_scale->const_data_ptr<float>() : nullptr,
                              a.found_inf ? a.found_inf->const_data_ptr<float>() : nullptr,
                              arrivals_for(a.steps[0], stream)};
  C10_CUDA_CHECK(step(Bucket<Kernel>{to_dtype(a.params[0].scalar_type()),
                                     static_cast<Boundary>(a.boundary),
                                     state_precision(a, states),
                                     args, tensors.data(), numels.data(), rounding_seeds.data(),
                                     static_cast<int32_t>(n)},
                      stream));
}

#define ADAPTIVE_LR_INSTANTIATE(name, Kernel)                                                  \
  template void fused_step<Kernel>(const char*, const ActiveArgs&, const std::vector<NamedList>&, \
                                   const Kernel::Hyper&);
ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_INSTANTIATE)
#undef ADAPTIVE_LR_INSTANTIATE

}  // namespace adaptive_lr::cuda
