// LayerNorm(x + residual) forward: one pass over global memory (x and the residual read once,
// y written once), float32 statistics with the centred sum of squares computed from registers.
#include "layer_norm.cuh"

namespace blip_fast {
namespace ln {

// Block: (threads_per_row, rows_per_block); a row per blockDim.x threads.
template <typename T, typename R, typename O, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads, 1) layer_norm_fwd_kernel(const LayerNormFwdArgs a) {
  constexpr bool kAligned = VEC > 1;
  __shared__ float smem[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.rows) return;  // a row's threads leave together (multi-warp rows: one per block)
  const int64_t n = a.n;
  const int tpr = blockDim.x;
  const T* x = static_cast<const T*>(a.x) + row * n;
  const R* r = a.residual == nullptr ? nullptr : static_cast<const R*>(a.residual) + row * n;

  float s[ITEMS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (threadIdx.x + i * tpr) * VEC;
    if (col < n) {
      load_sum<T, R, VEC>(x, r, col, s[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += s[i][j];
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  const float mean = row_sum(sum, smem) * inv_n;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (threadIdx.x + i * tpr) * VEC;
    if (col < n) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s[i][j] -= mean;
        sq += s[i][j] * s[i][j];
      }
    }
  }
  const float rstd = rsqrtf(row_sum(sq, smem) * inv_n + a.eps);

  O* y = static_cast<O*>(a.y) + row * n;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (threadIdx.x + i * tpr) * VEC;
    if (col < n) {
      float w[VEC], b[VEC];
      if (a.weight != nullptr) {
        load_param<VEC, kAligned>(a.weight, a.weight_dtype, col, w);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) w[j] = 1.f;
      }
      if (a.bias != nullptr) {
        load_param<VEC, kAligned>(a.bias, a.bias_dtype, col, b);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) b[j] = 0.f;
      }
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = s[i][j] * rstd * w[j] + b[j];
      store_floats<O, VEC, kAligned>(y + col, out);
    }
  }
  if (threadIdx.x == 0 && a.mean != nullptr) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

}  // namespace ln

bool layer_norm_dtypes_supported(DType x, bool has_residual, DType residual) {
  return ln::dispatch_types(x, has_residual, residual, [](auto, auto, auto) {});
}

cudaError_t layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream) {
  using namespace ln;
  if (a.n <= 0 || a.n > kLayerNormMaxN || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const bool aligned = aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) && aligned16(a.bias) &&
                       aligned16(a.y);
  const RowShape shape = row_shape(a.n, a.x_dtype, aligned, false);
  if (shape.items > max_items(shape.vec, false) ||
      static_cast<int64_t>(shape.items) * shape.threads_per_row * shape.vec < a.n)
    return cudaErrorInvalidValue;  // a shape the dispatch cannot cover (never for n <= kLayerNormMaxN)
  if (shape.vec == 1 && a.n > kLayerNormScalarMaxN) return cudaErrorInvalidValue;
  const int rows_per_block = shape.threads_per_row == 32 ? 4 : 1;
  const dim3 block(shape.threads_per_row, rows_per_block);
  const dim3 grid(static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block));
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_types(a.x_dtype, a.residual != nullptr, a.residual_dtype, [&](auto t, auto r, auto o) {
    using T = typename decltype(t)::type;
    using R = typename decltype(r)::type;
    using O = typename decltype(o)::type;
    dispatch_shape<T, false>(shape, [&](auto vec, auto items) {
      layer_norm_fwd_kernel<T, R, O, decltype(vec)::value, decltype(items)::value><<<grid, block, 0, stream>>>(a);
      err = cudaGetLastError();
    });
  });
  return err;
}

}  // namespace blip_fast
