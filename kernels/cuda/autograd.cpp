// Autograd of blip_fast_cuda::layer_norm in C++: the backward node runs without Python, so an
// eager training step pays the host time of torch's own LayerNorm, not of a Python
// autograd.Function. The forward and backward call the layer_norm_fwd / layer_norm_bwd ops
// through the dispatcher, so torch.compile (AOTAutograd) traces them as two graph nodes.
// Also here: the ADInplaceOrView kernel of momentum_update_, which bumps the version counters
// of the tensors it writes, as torch's own in-place ops do.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace blip_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  double eps, const OptTensor& residual, bool save_stats) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blip_fast_cuda::layer_norm_fwd", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                       const OptTensor&, double, const OptTensor&, bool)>();
  return op.call(x, weight, bias, eps, residual, save_stats);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& residual,
                                                          const OptTensor& weight, const OptTensor& bias,
                                                          const Tensor& mean, const Tensor& rstd, bool need_dx,
                                                          bool need_dr, bool need_dw, bool need_db) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("blip_fast_cuda::layer_norm_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                            const OptTensor&, const OptTensor&, const Tensor&,
                                                            const Tensor&, bool, bool, bool, bool)>();
  return op.call(dy, x, residual, weight, bias, mean, rstd, need_dx, need_dr, need_dw, need_db);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor maybe(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        double eps, const OptTensor& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = layer_norm_fwd(x, weight, bias, eps, residual, true);
    ctx->save_for_backward({x, present(weight) ? *weight : Tensor(), present(bias) ? *bias : Tensor(),
                            present(residual) ? *residual : Tensor(), mean, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &residual = saved[3];
    const Tensor &mean = saved[4], &rstd = saved[5];
    const Tensor& dy = grads[0];
    if (!dy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    // Edges exist for the tensor inputs that were given, in argument order.
    size_t edge = 0;
    const bool need_dx = ctx->needs_input_grad(edge++);
    const bool need_dw = weight.defined() && ctx->needs_input_grad(edge++);
    const bool need_db = bias.defined() && ctx->needs_input_grad(edge++);
    const bool need_dr = residual.defined() && ctx->needs_input_grad(edge++);
    // The residual's gradient equals dx; in x's dtype it is the same tensor (as add's backward
    // hands one gradient to both inputs), in another dtype the kernel stores a second copy.
    const bool shared = need_dr && residual.scalar_type() == x.scalar_type();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dr, dw, db] = layer_norm_bwd(dy, x, maybe(residual), maybe(weight), maybe(bias), mean, rstd,
                                           need_dx || shared, need_dr && !shared, need_dw, need_db);
    return {need_dx ? dx : Tensor(), need_dw ? dw : Tensor(), need_db ? db : Tensor(), Tensor(),
            need_dr ? (shared ? dx : dr) : Tensor()};
  }
};

Tensor layer_norm_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
                           const OptTensor& residual) {
  return LayerNormFunction::apply(x, weight, bias, eps, residual);
}

void momentum_update_inplace(at::TensorList params_m, at::TensorList params, double momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blip_fast_cuda::momentum_update_", "")
                             .typed<void(at::TensorList, at::TensorList, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(params_m, params, momentum);
  }
  for (const Tensor& t : params_m) torch::autograd::impl::bump_version(t);
}

}  // namespace
}  // namespace blip_fast

TORCH_LIBRARY_IMPL(blip_fast_cuda, Autograd, m) { m.impl("layer_norm", &blip_fast::layer_norm_autograd); }

TORCH_LIBRARY_IMPL(blip_fast_cuda, ADInplaceOrView, m) {
  m.impl("momentum_update_", &blip_fast::momentum_update_inplace);
}
