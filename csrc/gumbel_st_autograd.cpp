// Autograd of spottune_ext::gumbel_st for the compiled kernels, in C++: at a few thousand
// decisions the kernels take tens of microseconds, and a Python autograd round trip would cost
// more than they do. The backward is the gradient of the relaxed decision sigmoid(d / tau),
// applied to the hard one (straight-through). The Triton variant's autograd is registered in
// spottune_ext/ops/gumbel_st.py.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace spottune_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_gumbel_st(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Tensor>& seed, double tau, bool sample) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("spottune_ext::gumbel_st", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 const std::optional<at::Tensor>&, double, bool)>();
  return op.call(logits, noise, seed, tau, sample);
}

at::Tensor call_gumbel_st_backward(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("spottune_ext::gumbel_st_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad, soft, tau);
}

class GumbelST : public torch::autograd::Function<GumbelST> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& seed, double tau, bool sample) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [hard, soft] = call_gumbel_st(logits, noise, seed, tau, sample);
    ctx->save_for_backward({soft});
    ctx->saved_data["tau"] = tau;
    return {hard, soft};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto soft = ctx->get_saved_variables()[0];
    // Both outputs carry the relaxation's gradient: hard by straight-through, soft as itself.
    at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros(soft.sizes(), soft.options());
    if (grads[1].defined()) grad = grad + grads[1].to(grad.scalar_type());
    const auto grad_logits = call_gumbel_st_backward(grad, soft, ctx->saved_data["tau"].toDouble());
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> gumbel_st_autograd(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Tensor>& seed, double tau, bool sample) {
  auto out = GumbelST::apply(logits, noise, seed, tau, sample);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, Autograd, m) { m.impl("gumbel_st", &gumbel_st_autograd); }

}  // namespace spottune_ext
