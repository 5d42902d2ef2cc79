// The ActiveSGD CUDA kernels (one .cu per kernel tag, so the files
// compile in parallel).
#include "active_step.cuh"

namespace adaptive_lr::cuda {
template cudaError_t step<Sgd>(const Bucket<Sgd>&, cudaStream_t);
}  // namespace adaptive_lr::cuda
