// Multi-tensor momentum update: p_m = momentum * p_m + (1 - momentum) * p for every pair of a
// list (the EMA of BLIP's momentum encoders), up to kMomentumMaxTensors pairs per launch.
//
// The pair table travels in the kernel arguments (__grid_constant__: read in place from the
// parameter bank, no device buffer to fill or keep alive, so the call is CUDA-graph safe and
// costs no copy). Tensors are cut into chunks of kChunk elements; block b takes chunks b,
// b + gridDim.x, ... and finds each chunk's tensor by a binary search over the per-tensor
// chunk counts (uniform across the block). Chunks start at multiples of kChunk elements, so a
// 16-byte aligned tensor stays aligned chunk by chunk and is read and written in 16-byte
// vectors.
//
// Rounding follows the reference (torch's eager ops) exactly: p_m * momentum is rounded to
// p_m's dtype, p * (1 - momentum) to p's dtype, their float32 sum to p_m's dtype, without FMA
// contraction; the result is bit-identical to ``p_m.copy_(p_m * m + p * (1 - m))``.
#include <algorithm>

#include "common.cuh"

namespace blip_fast {
namespace momentum {

constexpr int kChunk = 1 << 16;
constexpr int kThreads = 512;
constexpr int kBlocksPerSM = 4;

struct Table {
  void* momentum_param[kMomentumMaxTensors];
  const void* param[kMomentumMaxTensors];
  int64_t numel[kMomentumMaxTensors];
  int32_t chunk_end[kMomentumMaxTensors];  // inclusive prefix sum of each tensor's chunk count
  uint8_t kind[kMomentumMaxTensors];       // momentum dtype * 3 + param dtype, + 16 if aligned
  int32_t tensors;
  int32_t chunks;
  float momentum;
  float one_minus_momentum;
};
static_assert(sizeof(Table) < 32764, "kernel arguments are limited to 32764 bytes");

template <typename TM, typename TP>
__device__ __forceinline__ float ema(float pm, float p, float m, float one_minus_m) {
  const float a = round_to<TM>(__fmul_rn(pm, m));
  const float b = round_to<TP>(__fmul_rn(p, one_minus_m));
  return __fadd_rn(a, b);
}

template <typename TM, typename TP>
__device__ void update_chunk(void* pm_ptr, const void* p_ptr, int64_t start, int count, bool aligned, float m,
                             float one_minus_m) {
  TM* pm = static_cast<TM*>(pm_ptr) + start;
  const TP* p = static_cast<const TP*>(p_ptr) + start;
  constexpr int kVec = 16 / sizeof(TM);
  int done = 0;
  if (aligned) {
    const int vectors = count / kVec;
    for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
      float a[kVec], b[kVec];
      load_floats<TM, kVec, true>(pm + v * kVec, a);
      load_floats<TP, kVec, true>(p + v * kVec, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) a[j] = ema<TM, TP>(a[j], b[j], m, one_minus_m);
      store_floats<TM, kVec, true>(pm + v * kVec, a);
    }
    done = vectors * kVec;
  }
  for (int i = done + threadIdx.x; i < count; i += blockDim.x)
    pm[i] = from_float<TM>(ema<TM, TP>(to_float(pm[i]), to_float(p[i]), m, one_minus_m));
}

__global__ void __launch_bounds__(kThreads) momentum_update_kernel(const __grid_constant__ Table t) {
  for (int chunk = blockIdx.x; chunk < t.chunks; chunk += gridDim.x) {
    int lo = 0, hi = t.tensors - 1;  // first tensor whose chunk_end > chunk
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (t.chunk_end[mid] > chunk) hi = mid;
      else lo = mid + 1;
    }
    const int local = chunk - (lo == 0 ? 0 : t.chunk_end[lo - 1]);
    const int64_t start = static_cast<int64_t>(local) * kChunk;
    const int count = static_cast<int>(min(static_cast<int64_t>(kChunk), t.numel[lo] - start));
    const int kind = t.kind[lo];
    const bool aligned = kind & 16;
    void* pm = t.momentum_param[lo];
    const void* p = t.param[lo];
    const float m = t.momentum, om = t.one_minus_momentum;
    switch (kind & 15) {
      case 0: update_chunk<float, float>(pm, p, start, count, aligned, m, om); break;
      case 1: update_chunk<float, __nv_bfloat16>(pm, p, start, count, aligned, m, om); break;
      case 2: update_chunk<float, __half>(pm, p, start, count, aligned, m, om); break;
      case 3: update_chunk<__nv_bfloat16, float>(pm, p, start, count, aligned, m, om); break;
      case 4: update_chunk<__nv_bfloat16, __nv_bfloat16>(pm, p, start, count, aligned, m, om); break;
      case 5: update_chunk<__nv_bfloat16, __half>(pm, p, start, count, aligned, m, om); break;
      case 6: update_chunk<__half, float>(pm, p, start, count, aligned, m, om); break;
      case 7: update_chunk<__half, __nv_bfloat16>(pm, p, start, count, aligned, m, om); break;
      default: update_chunk<__half, __half>(pm, p, start, count, aligned, m, om); break;
    }
  }
}

}  // namespace momentum

cudaError_t momentum_update(const MomentumPair* pairs, int64_t count, float m, float one_minus_m, int device,
                            cudaStream_t stream) {
  using namespace momentum;
  // Built on the heap: the table is ~30 KB, more than a host thread's stack should carry.
  static thread_local Table* table = new Table();
  Table& t = *table;
  int64_t next = 0;
  while (next < count) {
    t.tensors = 0;
    int64_t chunks = 0;
    for (; next < count && t.tensors < kMomentumMaxTensors; ++next) {
      const MomentumPair& pair = pairs[next];
      if (pair.numel <= 0) continue;
      const int64_t tensor_chunks = (pair.numel + kChunk - 1) / kChunk;
      if (chunks + tensor_chunks > INT32_MAX) break;  // the rest goes to the next launch
      const int i = t.tensors++;
      chunks += tensor_chunks;
      t.momentum_param[i] = pair.momentum_param;
      t.param[i] = pair.param;
      t.numel[i] = pair.numel;
      t.chunk_end[i] = static_cast<int32_t>(chunks);
      const bool aligned = reinterpret_cast<uintptr_t>(pair.momentum_param) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(pair.param) % 16 == 0;
      t.kind[i] = static_cast<uint8_t>(static_cast<int>(pair.momentum_dtype) * 3 + static_cast<int>(pair.param_dtype) +
                                       (aligned ? 16 : 0));
    }
    if (t.tensors == 0) continue;
    t.chunks = static_cast<int32_t>(chunks);
    t.momentum = m;
    t.one_minus_momentum = one_minus_m;
    const int64_t grid = std::min<int64_t>(chunks, static_cast<int64_t>(kBlocksPerSM) * sm_count(device));
    momentum_update_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(t);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace blip_fast
