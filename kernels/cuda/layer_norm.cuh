// Shared parts of the LayerNorm forward and backward kernels: the launch configuration (how
// many threads hold a row, how many 16-byte vectors each), the dtype dispatch and the row
// reductions.
//
// A row of n elements is read as n / VEC vectors of 16 bytes (VEC = 8 for bf16/fp16 x, 4 for
// float32), or element by element when a pointer is not 16-byte aligned or n % VEC != 0. One
// warp holds a row while it fits in 8 vectors per lane (n <= 2048 in 16-bit, 1024 in float32:
// every BLIP width), several rows per block; wider rows take 2..16 warps of one block. Every
// value of a row stays in registers between the statistics and the output.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace blip_fast {
namespace ln {

template <typename T>
struct Tag { using type = T; };

template <int V>
using Int = std::integral_constant<int, V>;

// Threads of a block at most (rows wider than one warp take up to 16 warps); with at most 64
// row values per thread, the 128 registers this allows hold a row without spilling.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarpsPerRow = kMaxThreads / 32;

struct RowShape {
  int vec = 1;             // elements per vector
  int items = 1;           // vectors per thread (an instantiated value, >= what the row needs)
  int threads_per_row = 32;
};

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Smallest instantiated ITEMS >= needed (dispatch_items lists the same values).
inline int round_items(int needed, int vec) {
  if (vec == 1) return needed <= 2 ? 2 : needed <= 4 ? 4 : needed <= 8 ? 8 : 16;
  return needed <= 4 ? needed : needed <= 6 ? 6 : 8;
}

// Vectors per thread a row may use: the forward holds one value per element, the backward two
// (xhat and dy), so its budget is half as large. The scalar path (one element per "vector")
// takes up to 16 elements per thread forward, 8 backward.
__host__ __device__ constexpr int max_items(int vec, bool backward) {
  return vec == 1 ? (backward ? 8 : 16) : backward ? 32 / vec : 8;
}

static_assert(kLayerNormScalarMaxN == kMaxWarpsPerRow * 32 * max_items(1, true), "scalar path capacity");

// ``aligned``: every pointer of the call is 16-byte aligned.
inline RowShape row_shape(int64_t n, DType x_dtype, bool aligned, bool backward) {
  RowShape s;
  const int vec = 16 / dtype_size(x_dtype);
  s.vec = aligned && n % vec == 0 ? vec : 1;
  const int64_t vectors = n / s.vec;
  // One warp while a lane holds at most max_items vectors; wider rows: enough warps that a lane
  // holds at most 4 vectors (or max_items single elements).
  const int64_t one_warp = max_items(s.vec, backward);
  const int64_t wide = s.vec == 1 ? one_warp : 4;
  int warps = 1;
  if (vectors > 32 * one_warp) {
    const int64_t needed = (vectors + 32 * wide - 1) / (32 * wide);
    while (warps < needed && warps < kMaxWarpsPerRow) warps *= 2;
  }
  s.threads_per_row = 32 * warps;
  const int needed = static_cast<int>((vectors + s.threads_per_row - 1) / s.threads_per_row);
  s.items = round_items(needed, s.vec);
  return s;
}

// Calls f(Tag<T>, Tag<R>, Tag<O>) for the storage types of x, residual and output; returns
// false for a pair the kernels do not take (two different 16-bit types).
template <typename F>
bool dispatch_types(DType x, bool has_residual, DType r, F&& f) {
  if (!has_residual || r == x) {
    switch (x) {
      case DType::kFloat32: f(Tag<float>{}, Tag<float>{}, Tag<float>{}); return true;
      case DType::kBFloat16: f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}); return true;
      case DType::kFloat16: f(Tag<__half>{}, Tag<__half>{}, Tag<__half>{}); return true;
    }
    return false;
  }
  if (r == DType::kFloat32) {
    if (x == DType::kBFloat16) { f(Tag<__nv_bfloat16>{}, Tag<float>{}, Tag<float>{}); return true; }
    if (x == DType::kFloat16) { f(Tag<__half>{}, Tag<float>{}, Tag<float>{}); return true; }
    return false;
  }
  if (x == DType::kFloat32) {
    if (r == DType::kBFloat16) { f(Tag<float>{}, Tag<__nv_bfloat16>{}, Tag<float>{}); return true; }
    if (r == DType::kFloat16) { f(Tag<float>{}, Tag<__half>{}, Tag<float>{}); return true; }
  }
  return false;
}

// Calls f(Int<VEC>, Int<ITEMS>) for a row shape (the values round_items returns), instantiating
// only ITEMS <= max_items(VEC, BACKWARD).
template <int VEC, bool BACKWARD, typename F>
void dispatch_items(int items, F&& f) {
  constexpr int kMax = max_items(VEC, BACKWARD);
  if constexpr (VEC == 1) {
    if (items <= 2) f(Int<1>{}, Int<2>{});
    else if (items <= 4) f(Int<1>{}, Int<4>{});
    else if (items <= 8 || kMax < 16) f(Int<1>{}, Int<8>{});
    else if constexpr (kMax >= 16) f(Int<1>{}, Int<16>{});
  } else {
    if (items <= 1) f(Int<VEC>{}, Int<1>{});
    else if (items <= 2) f(Int<VEC>{}, Int<2>{});
    else if (items <= 3) f(Int<VEC>{}, Int<3>{});
    else if (items <= 4 || kMax < 6) f(Int<VEC>{}, Int<4>{});
    else if constexpr (kMax >= 6) {
      if (items <= 6) f(Int<VEC>{}, Int<6>{});
      else f(Int<VEC>{}, Int<8>{});
    }
  }
}

template <typename T, bool BACKWARD, typename F>
void dispatch_shape(const RowShape& s, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (s.vec == 1) dispatch_items<1, BACKWARD>(s.items, f);
  else dispatch_items<kVec, BACKWARD>(s.items, f);
}

// Sum over the threads of a row: a warp shuffle, plus a pass through shared memory when a row
// spans several warps (then the block holds one row, so __syncthreads is uniform). Every warp
// reduces the per-warp partials in the same order, so all threads get the same value.
__device__ __forceinline__ float row_sum(float v, float* smem /* [32] */) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction has read smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? smem[lane] : 0.f);
}

__device__ __forceinline__ void row_sum2(float& a, float& b, float* smem /* [64] */) {
  warp_sum2(a, b);
  if (blockDim.x == 32) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
  }
  __syncthreads();
  a = lane < warps ? smem[lane] : 0.f;
  b = lane < warps ? smem[32 + lane] : 0.f;
  warp_sum2(a, b);
}

// Loads the VEC elements of a row starting at ``col`` of x (+ residual) as floats.
template <typename T, typename R, int VEC>
__device__ __forceinline__ void load_sum(const T* x, const R* r, int col, float (&s)[VEC]) {
  constexpr bool kAligned = VEC > 1;
  load_floats<T, VEC, kAligned>(x + col, s);
  if (r != nullptr) {
    float t[VEC];
    load_floats<R, VEC, kAligned>(r + col, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] += t[j];
  }
}

}  // namespace ln
}  // namespace blip_fast
