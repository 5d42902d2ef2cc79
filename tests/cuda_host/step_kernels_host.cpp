// csrc/cuda/step_kernels.cu, unchanged, compiled as C++ for the host emulation (its own file so
// that CMake's CUDA targets keep compiling the .cu itself with nvcc).
#include "step_kernels.cu"
