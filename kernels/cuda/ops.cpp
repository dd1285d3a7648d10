// Torch bindings of the native kernels: the ``blip_fast_cuda`` operator library.
//
//   layer_norm(x, weight, bias, eps, residual) -> y           autograd (autograd.cpp) + CUDA
//   layer_norm_fwd(x, weight, bias, eps, residual, save_stats) -> (y, mean, rstd)
//   layer_norm_bwd(dy, x, residual, weight, bias, mean, rstd, need_dx, need_dresidual,
//                  need_dweight, need_dbias) -> (dx, dresidual, dweight, dbias)
//   momentum_update_(params_m, params, momentum) -> ()        in place on params_m
//
// Gradients that are not requested come back as empty tensors. The fake (meta) kernels that
// torch.compile traces with are registered from Python (blip_fast/ops/cuda_backend.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "launchers.h"

namespace blip_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType to_dtype(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "blip_fast_cuda: ", what, " has dtype ", t.scalar_type(),
                  "; the native kernels take float32, bfloat16 or float16");
  }
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

const void* ptr_or_null(const OptTensor& t) { return present(t) ? t->data_ptr() : nullptr; }

bool vectorizable(int64_t n, const Tensor& x, std::initializer_list<const void*> ptrs) {
  if (n % (16 / static_cast<int64_t>(x.element_size())) != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void check_param(const OptTensor& p, const char* name, const Tensor& x, int64_t n) {
  if (!present(p)) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "blip_fast_cuda::layer_norm: ", name, " has shape ", p->sizes(),
              ", expected (", n, ",) to match x's last dimension");
  TORCH_CHECK(p->device() == x.device(), "blip_fast_cuda::layer_norm: ", name, " is on ", p->device(), ", x on ",
              x.device());
  to_dtype(*p, name);
}

// Shared argument checks; returns the normalised width n and the row count.
std::pair<int64_t, int64_t> check_layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                             const OptTensor& residual) {
  TORCH_CHECK(x.is_cuda(), "blip_fast_cuda::layer_norm: x is on ", x.device(), "; the native kernels run CUDA tensors");
  TORCH_CHECK(x.dim() >= 1, "blip_fast_cuda::layer_norm: x must have at least one dimension");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1 && n <= kLayerNormMaxN, "blip_fast_cuda::layer_norm: normalised dimension ", n,
              " is outside 1..", kLayerNormMaxN, " (use the triton or reference backend)");
  const DType xd = to_dtype(x, "x");
  check_param(weight, "weight", x, n);
  check_param(bias, "bias", x, n);
  if (present(residual)) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "blip_fast_cuda::layer_norm: residual shape ", residual->sizes(),
                " differs from x's ", x.sizes());
    TORCH_CHECK(residual->device() == x.device(), "blip_fast_cuda::layer_norm: residual is on ", residual->device(),
                ", x on ", x.device());
    TORCH_CHECK(layer_norm_dtypes_supported(xd, true, to_dtype(*residual, "residual")),
                "blip_fast_cuda::layer_norm: x (", x.scalar_type(), ") with a residual of ", residual->scalar_type(),
                " is not supported (same dtype, or one of them float32)");
  }
  return {n, n == 0 ? 0 : x.numel() / n};
}

void check_scalar_width(int64_t n, bool vector_path) {
  TORCH_CHECK(vector_path || n <= kLayerNormScalarMaxN, "blip_fast_cuda::layer_norm: width ", n,
              " needs 16-byte aligned tensors and a multiple of 16 bytes per row (the element-wise path takes up to ",
              kLayerNormScalarMaxN, ")");
}

Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

OptTensor contiguous(const OptTensor& t) {
  if (!present(t)) return std::nullopt;
  return contiguous(*t);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x_in, const OptTensor& weight_in,
                                                       const OptTensor& bias_in, double eps,
                                                       const OptTensor& residual_in, bool save_stats) {
  const auto [n, rows] = check_layer_norm(x_in, weight_in, bias_in, residual_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = contiguous(x_in);
  const OptTensor weight = contiguous(weight_in), bias = contiguous(bias_in), residual = contiguous(residual_in);
  const at::ScalarType out_type =
      present(residual) ? c10::promoteTypes(x.scalar_type(), residual->scalar_type()) : x.scalar_type();
  Tensor y = at::empty(x.sizes(), x.options().dtype(out_type));
  Tensor mean = at::empty({save_stats ? rows : 0}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({save_stats ? rows : 0}, x.options().dtype(at::kFloat));
  LayerNormFwdArgs a;
  a.x = x.data_ptr();
  a.residual = ptr_or_null(residual);
  a.weight = ptr_or_null(weight);
  a.bias = ptr_or_null(bias);
  a.y = y.data_ptr();
  a.mean = save_stats ? mean.data_ptr<float>() : nullptr;
  a.rstd = save_stats ? rstd.data_ptr<float>() : nullptr;
  a.rows = rows;
  a.n = n;
  a.eps = static_cast<float>(eps);
  a.x_dtype = to_dtype(x, "x");
  if (present(residual)) a.residual_dtype = to_dtype(*residual, "residual");
  if (present(weight)) a.weight_dtype = to_dtype(*weight, "weight");
  if (present(bias)) a.bias_dtype = to_dtype(*bias, "bias");
  check_scalar_width(n, vectorizable(n, x, {a.x, a.residual, a.weight, a.bias, a.y}));
  C10_CUDA_CHECK(layer_norm_fwd(a, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()));
  return {y, mean, rstd};
}

Tensor layer_norm_cuda(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
                       const OptTensor& residual) {
  return std::get<0>(layer_norm_fwd_cuda(x, weight, bias, eps, residual, false));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy_in, const Tensor& x_in,
                                                               const OptTensor& residual_in, const OptTensor& weight_in,
                                                               const OptTensor& bias_in, const Tensor& mean,
                                                               const Tensor& rstd, bool need_dx, bool need_dr,
                                                               bool need_dw, bool need_db) {
  const auto [n, rows] = check_layer_norm(x_in, weight_in, bias_in, residual_in);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              "blip_fast_cuda::layer_norm_bwd: mean and rstd must be the forward's float32 statistics (", rows,
              " rows)");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "blip_fast_cuda::layer_norm_bwd: grad shape ", dy_in.sizes(),
              " differs from x's ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = contiguous(x_in);
  const OptTensor weight = contiguous(weight_in), residual = contiguous(residual_in);
  const Tensor mean_c = contiguous(mean), rstd_c = contiguous(rstd);
  const at::ScalarType out_type =
      present(residual) ? c10::promoteTypes(x.scalar_type(), residual->scalar_type()) : x.scalar_type();
  const Tensor dy = dy_in.scalar_type() == out_type ? contiguous(dy_in) : dy_in.to(out_type).contiguous();
  need_dr = need_dr && present(residual);
  need_dw = need_dw && present(weight);
  need_db = need_db && present(bias_in);
  // Outputs not asked for are empty, each its own tensor (an op's outputs must not alias).
  const auto none = [&] { return at::empty({0}, x.options()); };
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : none();
  Tensor dr = need_dr ? at::empty(x.sizes(), residual->options()) : none();
  Tensor dw = need_dw ? at::empty({n}, weight->options()) : none();
  Tensor db = need_db ? at::empty({n}, bias_in->options()) : none();
  if (!need_dx && !need_dr && !need_dw && !need_db) return {dx, dr, dw, db};
  LayerNormBwdArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.residual = ptr_or_null(residual);
  a.weight = ptr_or_null(weight);
  a.mean = mean_c.data_ptr<float>();
  a.rstd = rstd_c.data_ptr<float>();
  a.dx = need_dx ? dx.data_ptr() : nullptr;
  a.dresidual = need_dr ? dr.data_ptr() : nullptr;
  a.dweight = need_dw ? dw.data_ptr() : nullptr;
  a.dbias = need_db ? db.data_ptr() : nullptr;
  a.rows = rows;
  a.n = n;
  a.x_dtype = to_dtype(x, "x");
  if (present(residual)) a.residual_dtype = to_dtype(*residual, "residual");
  if (present(weight)) a.weight_dtype = to_dtype(*weight, "weight");
  if (need_dw) a.dweight_dtype = to_dtype(dw, "weight");
  if (need_db) a.dbias_dtype = to_dtype(db, "bias");
  check_scalar_width(n, vectorizable(n, x, {a.dy, a.x, a.residual, a.weight, a.dx, a.dresidual}));
  const int device = x.get_device();
  const int64_t workspace_size = layer_norm_bwd_workspace(a, device);
  const Tensor workspace = at::empty({workspace_size}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(layer_norm_bwd(a, workspace_size > 0 ? workspace.data_ptr<float>() : nullptr, device,
                                c10::cuda::getCurrentCUDAStream(device).stream()));
  return {dx, dr, dw, db};
}

void momentum_update_cuda(at::TensorList params_m, at::TensorList params, double momentum) {
  TORCH_CHECK(params_m.size() == params.size(), "blip_fast_cuda::momentum_update_: ", params_m.size(),
              " momentum parameters but ", params.size(), " online ones");
  if (params_m.empty()) return;
  const at::Device device = params_m[0].device();
  std::vector<MomentumPair> pairs;
  pairs.reserve(params_m.size());
  for (size_t i = 0; i < params_m.size(); ++i) {
    const Tensor& pm = params_m[i];
    const Tensor& p = params[i];
    TORCH_CHECK(pm.device() == device && p.device() == device, "blip_fast_cuda::momentum_update_: pair #", i, " is on ",
                pm.device(), " / ", p.device(), "; every tensor must be on ", device);
    TORCH_CHECK(pm.numel() == p.numel(), "blip_fast_cuda::momentum_update_: pair #", i, " has ", pm.numel(), " and ",
                p.numel(), " elements");
    TORCH_CHECK(pm.is_contiguous() && p.is_contiguous(), "blip_fast_cuda::momentum_update_: pair #", i,
                " is not contiguous (the kernel updates flat storage in place)");
    MomentumPair pair;
    pair.momentum_param = pm.data_ptr();
    pair.param = p.data_ptr();
    pair.numel = pm.numel();
    pair.momentum_dtype = to_dtype(pm, "a momentum parameter");
    pair.param_dtype = to_dtype(p, "a parameter");
    pairs.push_back(pair);
  }
  TORCH_CHECK(device.is_cuda(), "blip_fast_cuda::momentum_update_: tensors on ", device);
  const c10::cuda::CUDAGuard guard(device);
  // As torch rounds the Python floats m and (1.0 - m) for a float32 multiply.
  const float m = static_cast<float>(momentum);
  const float one_minus_m = static_cast<float>(1.0 - momentum);
  C10_CUDA_CHECK(momentum_update(pairs.data(), static_cast<int64_t>(pairs.size()), m, one_minus_m, device.index(),
                                 c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}

}  // namespace
}  // namespace blip_fast

TORCH_LIBRARY(blip_fast_cuda, m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual=None) -> Tensor");
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual, bool save_stats)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd,"
      " bool need_dx, bool need_dresidual, bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("momentum_update_(Tensor(a!)[] params_m, Tensor[] params, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(blip_fast_cuda, CUDA, m) {
  m.impl("layer_norm", &blip_fast::layer_norm_cuda);
  m.impl("layer_norm_fwd", &blip_fast::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &blip_fast::layer_norm_bwd_cuda);
  m.impl("momentum_update_", &blip_fast::momentum_update_cuda);
}
