// Device helpers shared by the kernels of the native extension: storage types, float
// conversion, 16-byte vector loads/stores and warp reductions. Torch-free (CUDA headers only),
// so the kernels compile and can be checked with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace blip_fast {

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <>
struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };
template <>
struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ``v`` rounded to T's precision and back (round to nearest even), as storing it would.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// N consecutive elements of T, aligned to their size but at most to 16 bytes: a pack of 16 bytes
// is one 128-bit load; a larger one (8 float32 next to 8 bf16) splits into 128-bit loads.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Loads N elements of T from ``p`` as floats. ALIGNED: ``p`` is aligned to the pack (the
// vectorised path: every tensor 16-byte aligned and the row length a multiple of N).
template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  if constexpr (ALIGNED) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
  }
}

template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  if constexpr (ALIGNED) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Loads N elements of a parameter whose dtype is only known at run time (LayerNorm weight and
// bias may be float32 master weights next to bf16 activations). The switch is uniform across
// the grid, so it costs no divergence.
template <int N, bool ALIGNED>
__device__ __forceinline__ void load_param(const void* p, DType dtype, int64_t offset, float (&out)[N]) {
  switch (dtype) {
    case DType::kFloat32:
      load_floats<float, N, ALIGNED>(static_cast<const float*>(p) + offset, out);
      break;
    case DType::kBFloat16:
      load_floats<__nv_bfloat16, N, ALIGNED>(static_cast<const __nv_bfloat16*>(p) + offset, out);
      break;
    default:
      load_floats<__half, N, ALIGNED>(static_cast<const __half*>(p) + offset, out);
      break;
  }
}

__device__ __forceinline__ void store_param(void* p, DType dtype, int64_t offset, float v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(p)[offset] = v; break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[offset] = __float2bfloat16_rn(v); break;
    default: static_cast<__half*>(p)[offset] = __float2half_rn(v); break;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ void warp_sum2(float& a, float& b) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
}

}  // namespace blip_fast

namespace blip_fast {

// Streaming multiprocessors of ``device`` (cached; devices are few and never change).
inline int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
      cudaGetLastError();  // not sticky: clear it, fall back to a plausible count
      count = 108;
    }
    cached[device] = count;
  }
  return cached[device];
}

}  // namespace blip_fast
