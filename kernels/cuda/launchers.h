// Host API of the native kernels: plain structs of pointers and sizes, no torch types, so the
// .cu files compile with nvcc alone. The torch bindings (ops.cpp) check the tensors, allocate
// the outputs and call these on the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace blip_fast {

// Storage dtype of a tensor argument.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Largest normalised width the LayerNorm kernels take (a row lives in registers), and the
// largest when the row cannot be read in 16-byte vectors (a pointer not 16-byte aligned, or n
// not a multiple of 16 / sizeof(x's dtype)).
constexpr int64_t kLayerNormMaxN = 8192;
constexpr int64_t kLayerNormScalarMaxN = 4096;

// LayerNorm(x + residual) over rows of ``n`` contiguous elements; every tensor is contiguous.
// The output dtype is x's when the residual is absent or of x's dtype, else float32 (a 16-bit
// x with a float32 residual, or the reverse: torch's type promotion). Statistics in float32.
struct LayerNormFwdArgs {
  const void* x = nullptr;
  const void* residual = nullptr;  // optional
  const void* weight = nullptr;    // optional, (n,)
  const void* bias = nullptr;      // optional, (n,)
  void* y = nullptr;
  float* mean = nullptr;  // optional (rows,): written when not null
  float* rstd = nullptr;  // optional (rows,): 1 / sqrt(var + eps)
  int64_t rows = 0;
  int64_t n = 0;
  float eps = 0.f;
  DType x_dtype = DType::kFloat32;
  DType residual_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
};

// Gradients of LayerNorm(x + residual) given dy (dtype of y). Null outputs are not computed:
// dx (x's dtype), dresidual (residual's dtype; leave null when it equals dx, i.e. same dtype),
// dweight / dbias (the parameters' dtypes, reduced over rows in a fixed order).
struct LayerNormBwdArgs {
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* residual = nullptr;
  const void* weight = nullptr;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  void* dx = nullptr;
  void* dresidual = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  DType x_dtype = DType::kFloat32;
  DType residual_dtype = DType::kFloat32;
  DType weight_dtype = DType::kFloat32;
  DType dweight_dtype = DType::kFloat32;
  DType dbias_dtype = DType::kFloat32;
};

// Whether the kernels take this x / residual dtype pair (has_residual false: any x dtype).
bool layer_norm_dtypes_supported(DType x, bool has_residual, DType residual);

cudaError_t layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);

// Float32 workspace elements layer_norm_bwd needs for these arguments on ``device`` (the
// per-block partial sums of dweight and dbias; 0 when neither is requested).
int64_t layer_norm_bwd_workspace(const LayerNormBwdArgs& args, int device);

cudaError_t layer_norm_bwd(const LayerNormBwdArgs& args, float* workspace, int device, cudaStream_t stream);

// One pair of the momentum update: p_m = momentum * p_m + (1 - momentum) * p, in place on
// ``momentum_param``; both contiguous with ``numel`` elements, on the same device.
struct MomentumPair {
  void* momentum_param = nullptr;
  const void* param = nullptr;
  int64_t numel = 0;
  DType momentum_dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
};

// Every pair in as few launches as the kernel-argument table allows (one for up to
// kMomentumMaxTensors pairs). ``one_minus_momentum`` is passed separately so that the caller
// rounds (1 - momentum) exactly as torch does for a Python float.
constexpr int kMomentumMaxTensors = 1024;
cudaError_t momentum_update(const MomentumPair* pairs, int64_t count, float momentum, float one_minus_momentum,
                            int device, cudaStream_t stream);

}  // namespace blip_fast
