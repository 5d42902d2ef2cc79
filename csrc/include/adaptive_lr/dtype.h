// The param dtypes the kernels compute on, shared by the CPU and CUDA launchers and their torch
// glue. Torch-free: the mapping from torch's dtype is a template over at::ScalarType (any enum
// with its enumerator names), so the kernel sources need no torch header.
#pragma once

namespace adaptive_lr {

enum class DType { kFloat, kDouble, kBFloat16, kHalf };

// The DType of a params dtype that validation let through (float32/64, bfloat16, float16).
template <class ScalarType>
constexpr DType to_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat;
    case ScalarType::Double: return DType::kDouble;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: return DType::kHalf;
  }
}

}  // namespace adaptive_lr
