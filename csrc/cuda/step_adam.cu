// The ActiveAdamW and ActiveRAdam CUDA kernels (one .cu per kernel tag, so the files
// compile in parallel).
#include "active_step.cuh"

namespace adaptive_lr::cuda {
template cudaError_t step<Adam<false>>(const Bucket<Adam<false>>&, cudaStream_t);
}  // namespace adaptive_lr::cuda
