// The ActiveAdaBelief CUDA kernels (one .cu per kernel tag, so the files
// compile in parallel).
#include "active_step.cuh"

namespace adaptive_lr::cuda {
template cudaError_t step<Adam<true>>(const Bucket<Adam<true>>&, cudaStream_t);
}  // namespace adaptive_lr::cuda
