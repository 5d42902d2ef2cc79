// The CUDA implementation behind torch.ops.adaptive_lr.active_step_ (csrc/cuda/ops_cuda.cpp),
// compiled and registered only when the extension is built against a CUDA build of torch.
#pragma once

#include <vector>

#include "active_args.h"

namespace adaptive_lr::cuda {

// Validates every tensor (all on the params' CUDA device), then enqueues the bucket's step on the
// device's current stream. The hyperparameters' lr is ignored: the kernels read a.lr on the device.
template <class Kernel>
void fused_step(const char* op, const ActiveArgs& a, const std::vector<NamedList>& states,
                const typename Kernel::Hyper& hyper);

}  // namespace adaptive_lr::cuda
