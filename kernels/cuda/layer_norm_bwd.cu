// LayerNorm(x + residual) backward.
//
// dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)), with xhat recomputed from x (+ the
// residual) and the forward's float32 mean / rstd; the residual's gradient is the same value in
// its own dtype. A persistent grid (as many blocks as the SMs hold at once) walks the rows; each
// thread accumulates dweight = sum(dy * xhat) and dbias = sum(dy) for its columns in shared
// memory, the block folds its rows into one float32 partial row, and a second small kernel sums
// the partial rows in a fixed order (deterministic) into the parameters' dtypes.
#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "layer_norm.cuh"

namespace blip_fast {
namespace ln {

struct BwdKernelArgs {
  LayerNormBwdArgs a;
  float* dw_part;  // (gridDim.x, n) or null
  float* db_part;  // (gridDim.x, n) or null
};

// Block: (threads_per_row, rows_per_block). Dynamic shared memory: 2 * rows_per_block * n floats
// when dweight or dbias is requested (16-byte aligned per row in the vector path: n % 4 == 0).
template <typename T, typename R, typename O, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads, 1) layer_norm_bwd_kernel(const BwdKernelArgs k) {
  constexpr bool kAligned = VEC > 1;
  // Short rows keep dy in registers between the two passes; long ones read it again (L1 hit).
  constexpr bool kKeepDy = ITEMS * VEC <= 32;
  extern __shared__ float4 dynamic_smem[];
  __shared__ float smem[64];
  const LayerNormBwdArgs& a = k.a;
  const int64_t n = a.n;
  const int tpr = blockDim.x;
  const bool params = k.dw_part != nullptr || k.db_part != nullptr;
  float* acc_dw = reinterpret_cast<float*>(dynamic_smem) + static_cast<int64_t>(threadIdx.y) * n;
  float* acc_db = acc_dw + static_cast<int64_t>(blockDim.y) * n;
  if (params) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (threadIdx.x + i * tpr) * VEC;
      if (col < n) {
        float zero[VEC] = {};
        store_floats<float, VEC, kAligned>(acc_dw + col, zero);
        store_floats<float, VEC, kAligned>(acc_db + col, zero);
      }
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows; row += row_step) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    const R* r = a.residual == nullptr ? nullptr : static_cast<const R*>(a.residual) + row * n;
    const O* dy = static_cast<const O*>(a.dy) + row * n;
    const float mean = a.mean[row];
    const float rstd = a.rstd[row];
    float xhat[ITEMS][VEC];
    float g[kKeepDy ? ITEMS : 1][VEC];
    float sum_xw = 0.f, sum_w = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (threadIdx.x + i * tpr) * VEC;
      if (col < n) {
        load_sum<T, R, VEC>(x, r, col, xhat[i]);
        float gi[VEC], w[VEC];
        load_floats<O, VEC, kAligned>(dy + col, gi);
        if (a.weight != nullptr) {
          load_param<VEC, kAligned>(a.weight, a.weight_dtype, col, w);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) w[j] = 1.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[i][j] = (xhat[i][j] - mean) * rstd;
          const float wdy = gi[j] * w[j];
          sum_xw += xhat[i][j] * wdy;
          sum_w += wdy;
          if constexpr (kKeepDy) g[i][j] = gi[j];
        }
        if (params) {  // 16-byte shared-memory accesses in the vector path
          float dw[VEC], db[VEC];
          load_floats<float, VEC, kAligned>(acc_dw + col, dw);
          load_floats<float, VEC, kAligned>(acc_db + col, db);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            dw[j] += gi[j] * xhat[i][j];
            db[j] += gi[j];
          }
          store_floats<float, VEC, kAligned>(acc_dw + col, dw);
          store_floats<float, VEC, kAligned>(acc_db + col, db);
        }
      }
    }
    row_sum2(sum_xw, sum_w, smem);
    const float c1 = sum_xw * inv_n, c2 = sum_w * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (threadIdx.x + i * tpr) * VEC;
      if (col < n) {
        float gi[VEC], w[VEC], ds[VEC];
        if constexpr (kKeepDy) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) gi[j] = g[i][j];
        } else {
          load_floats<O, VEC, kAligned>(dy + col, gi);
        }
        if (a.weight != nullptr) {
          load_param<VEC, kAligned>(a.weight, a.weight_dtype, col, w);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) w[j] = 1.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) ds[j] = (gi[j] * w[j] - xhat[i][j] * c1 - c2) * rstd;
        if (a.dx != nullptr) store_floats<T, VEC, kAligned>(static_cast<T*>(a.dx) + row * n + col, ds);
        if (a.dresidual != nullptr) store_floats<R, VEC, kAligned>(static_cast<R*>(a.dresidual) + row * n + col, ds);
      }
    }
  }
  if (!params) return;
  // Fold the block's rows into its partial row, in a fixed order.
  __syncthreads();
  const int threads = blockDim.x * blockDim.y;
  const float* block_dw = reinterpret_cast<const float*>(dynamic_smem);
  const float* block_db = block_dw + static_cast<int64_t>(blockDim.y) * n;
  for (int64_t c = static_cast<int64_t>(threadIdx.y) * blockDim.x + threadIdx.x; c < n; c += threads) {
    float sw = 0.f, sb = 0.f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
      sw += block_dw[y * n + c];
      sb += block_db[y * n + c];
    }
    if (k.dw_part != nullptr) k.dw_part[static_cast<int64_t>(blockIdx.x) * n + c] = sw;
    if (k.db_part != nullptr) k.db_part[static_cast<int64_t>(blockIdx.x) * n + c] = sb;
  }
}

// Grid (ceil(n / 32), 2), block (32, 16): column sums of the (parts, n) partials; blockIdx.y
// 0 sums dweight, 1 dbias (a block whose output is not requested returns).
__global__ void __launch_bounds__(512) layer_norm_param_grad_kernel(const float* dw_part, const float* db_part,
                                                                    int parts, int64_t n, void* dw, DType dw_dtype,
                                                                    void* db, DType db_dtype) {
  __shared__ float tile[16][33];
  const float* part = blockIdx.y == 0 ? dw_part : db_part;
  void* out = blockIdx.y == 0 ? dw : db;
  if (part == nullptr || out == nullptr) return;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (col < n)
    for (int p = threadIdx.y; p < parts; p += 16) s += part[static_cast<int64_t>(p) * n + col];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 16; ++y) total += tile[y][threadIdx.x];
    store_param(out, blockIdx.y == 0 ? dw_dtype : db_dtype, col, total);
  }
}

// Blocks per SM of a (kernel, block size, shared memory) on a device; the opt-in for more
// than 48 KiB of dynamic shared memory is set on first use.
int resident_blocks(const void* kernel, int threads, size_t smem, int device) {
  struct Key {
    const void* kernel;
    int threads;
    size_t smem;
    int device;
    bool operator==(const Key& o) const {
      return kernel == o.kernel && threads == o.threads && smem == o.smem && device == o.device;
    }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.kernel) ^ (static_cast<size_t>(k.threads) << 1) ^ (k.smem << 12) ^
             (static_cast<size_t>(k.device) << 40);
    }
  };
  static std::mutex mutex;
  static std::unordered_map<Key, int, Hash> cache;
  const Key key{kernel, threads, smem, device};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess || blocks < 1) {
    cudaGetLastError();
    blocks = 1;
  }
  cache.emplace(key, blocks);
  return blocks;
}

struct BwdPlan {
  const void* kernel = nullptr;
  dim3 grid, block;
  size_t smem = 0;
};

// Warps per SM the persistent grid aims at: enough loads in flight to keep HBM busy. Each
// block adds a partial row of dweight and dbias (2 * n floats written, then read), so blocks
// are made large (up to 16 rows of one warp each) and few (about one per SM at BLIP's widths:
// 132 partial rows of 768 are 0.8 MB, against 58 MB of x, dy and dx at 64 x 197 x 768 bf16).
constexpr int kBwdWarpsPerSM = 32;
constexpr int kBwdMaxRowsPerBlock = kMaxThreads / 32;
constexpr size_t kBwdSmemBudget = 96 * 1024;

// Dynamic shared memory a block of ``device`` may opt into, less the kernel's static 256 bytes.
size_t smem_optin(int device) {
  static size_t cached[64] = {0};
  const int slot = device >= 0 && device < 64 ? device : 0;
  if (cached[slot] == 0) {
    int bytes = 0;
    if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || bytes <= 0) {
      cudaGetLastError();
      bytes = 48 * 1024;
    }
    cached[slot] = static_cast<size_t>(bytes) - 1024;
  }
  return cached[slot];
}

BwdPlan plan_bwd(const LayerNormBwdArgs& a, int device) {
  BwdPlan plan;
  const bool aligned = aligned16(a.dy) && aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) &&
                       aligned16(a.dx) && aligned16(a.dresidual);
  const RowShape shape = row_shape(a.n, a.x_dtype, aligned, true);
  if (shape.items > max_items(shape.vec, true) ||
      static_cast<int64_t>(shape.items) * shape.threads_per_row * shape.vec < a.n)
    return plan;  // a shape the dispatch cannot cover (never for n <= kLayerNormMaxN)
  if (shape.vec == 1 && a.n > kLayerNormScalarMaxN) return plan;  // no kernel: the caller reports it
  const bool params = a.dweight != nullptr || a.dbias != nullptr;
  const size_t row_smem = params ? 2 * static_cast<size_t>(a.n) * sizeof(float) : 0;
  int rows_per_block = 1;
  if (shape.threads_per_row == 32) {
    const size_t budget = std::min(kBwdSmemBudget, smem_optin(device));
    rows_per_block = row_smem == 0 ? kBwdMaxRowsPerBlock
                                   : static_cast<int>(std::max<size_t>(1, std::min<size_t>(kBwdMaxRowsPerBlock, budget / row_smem)));
  }
  plan.block = dim3(shape.threads_per_row, rows_per_block);
  plan.smem = row_smem * rows_per_block;
  dispatch_types(a.x_dtype, a.residual != nullptr, a.residual_dtype, [&](auto t, auto r, auto o) {
    using T = typename decltype(t)::type;
    using R = typename decltype(r)::type;
    using O = typename decltype(o)::type;
    dispatch_shape<T, true>(shape, [&](auto vec, auto items) {
      plan.kernel = reinterpret_cast<const void*>(
          &layer_norm_bwd_kernel<T, R, O, decltype(vec)::value, decltype(items)::value>);
    });
  });
  if (plan.kernel == nullptr) return plan;
  const int threads = shape.threads_per_row * rows_per_block;
  const int per_sm = std::min(resident_blocks(plan.kernel, threads, plan.smem, device),
                              std::max(1, kBwdWarpsPerSM * 32 / threads));
  const int64_t row_blocks = (a.rows + rows_per_block - 1) / rows_per_block;
  plan.grid = dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(row_blocks, per_sm * sm_count(device)))));
  return plan;
}

int64_t partial_outputs(const LayerNormBwdArgs& a) { return (a.dweight != nullptr) + (a.dbias != nullptr); }

}  // namespace ln

int64_t layer_norm_bwd_workspace(const LayerNormBwdArgs& a, int device) {
  if (a.rows <= 0 || a.n <= 0 || ln::partial_outputs(a) == 0) return 0;
  const ln::BwdPlan plan = ln::plan_bwd(a, device);
  return ln::partial_outputs(a) * static_cast<int64_t>(plan.grid.x) * a.n;
}

cudaError_t layer_norm_bwd(const LayerNormBwdArgs& a, float* workspace, int device, cudaStream_t stream) {
  using namespace ln;
  if (a.n <= 0 || a.n > kLayerNormMaxN || a.rows < 0) return cudaErrorInvalidValue;
  const bool params = partial_outputs(a) > 0;
  if (a.rows == 0) {  // no rows: zero parameter gradients
    for (auto [out, dtype] : {std::make_pair(a.dweight, a.dweight_dtype), std::make_pair(a.dbias, a.dbias_dtype)}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, a.n * dtype_size(dtype), stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const BwdPlan plan = plan_bwd(a, device);
  if (plan.kernel == nullptr) return cudaErrorInvalidValue;
  if (params && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t part_size = static_cast<int64_t>(plan.grid.x) * a.n;
  BwdKernelArgs k{a, a.dweight != nullptr ? workspace : nullptr,
                  a.dbias != nullptr ? workspace + (a.dweight != nullptr ? part_size : 0) : nullptr};
  void* args[] = {&k};
  cudaError_t err = cudaLaunchKernel(plan.kernel, plan.grid, plan.block, args, plan.smem, stream);
  if (err != cudaSuccess || !params) return err;
  const dim3 grid(static_cast<unsigned>((a.n + 31) / 32), 2);
  layer_norm_param_grad_kernel<<<grid, dim3(32, 16), 0, stream>>>(k.dw_part, k.db_part, static_cast<int>(plan.grid.x), a.n,
                                                                   a.dweight, a.dweight_dtype, a.dbias, a.dbias_dtype);
  return cudaGetLastError();
}

}  // namespace blip_fast
