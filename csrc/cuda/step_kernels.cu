// The CUDA kernels of every optimizer in math.h's ADAPTIVE_LR_KERNELS, in one translation unit:
// adding an optimizer touches no CUDA file, and the shared headers are parsed once.
#include "active_step.cuh"

namespace adaptive_lr::cuda {
#define ADAPTIVE_LR_INSTANTIATE(name, Kernel) \
  template cudaError_t step<Kernel>(const Bucket<Kernel>&, cudaStream_t);
ADAPTIVE_LR_KERNELS(ADAPTIVE_LR_INSTANTIATE)
#undef ADAPTIVE_LR_INSTANTIATE
}  // namespace adaptive_lr::cuda
