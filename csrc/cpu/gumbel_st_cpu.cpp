// CPU kernels of spottune_ext::gumbel_st and its backward: one pass over the decisions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gumbel_st_math.h"

namespace spottune_ext {
namespace {

constexpr int64_t kGrain = 4096;

std::tuple<at::Tensor, at::Tensor> gumbel_st_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Tensor>& seed, double tau, bool sample) {
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) == 2, "gumbel_st: logits must be [B, L, 2]");
  const bool use_noise = sample && noise.has_value();
  const bool use_seed = sample && !use_noise;
  TORCH_CHECK(!use_seed || seed.has_value(), "gumbel_st: sampling needs noise or a seed");
  const auto x = logits.contiguous();
  const auto u = use_noise ? noise->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t n = x.size(0) * x.size(1);
  const int64_t seed_value = use_seed ? seed->item<int64_t>() : 0;
  auto hard = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor soft;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_st_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft = at::empty({x.size(0), x.size(1)}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const float* u_ptr = use_noise ? u.const_data_ptr<float>() : nullptr;
    scalar_t* out = hard.data_ptr<scalar_t>();
    acc_t* soft_ptr = soft.data_ptr<acc_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t g = 0;
        if (use_noise) g = logistic_noise<acc_t>(u_ptr[i]);
        if (use_seed) g = logistic_noise<acc_t>(philox_uniform(seed_value, static_cast<uint32_t>(i)));
        acc_t h;
        gumbel_decision<acc_t>(in[2 * i], in[2 * i + 1], g, inv_tau, &h, &soft_ptr[i]);
        out[i] = static_cast<scalar_t>(h);
      }
    });
  });
  return {hard, soft};
}

at::Tensor gumbel_st_backward_cpu(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  const auto g = grad.contiguous();
  const auto s = soft.contiguous();
  const int64_t n = g.numel();
  auto out = at::empty({g.size(0), g.size(1), 2}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gumbel_st_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(s.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "gumbel_st_backward: soft has the wrong dtype");
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const acc_t* s_ptr = s.const_data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t si = s_ptr[i];
        const acc_t d1 = static_cast<acc_t>(g_ptr[i]) * si * (acc_t(1) - si) * inv_tau;
        o[2 * i] = static_cast<scalar_t>(-d1);
        o[2 * i + 1] = static_cast<scalar_t>(d1);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CPU, m) {
  m.impl("gumbel_st", &gumbel_st_cpu);
  m.impl("gumbel_st_backward", &gumbel_st_backward_cpu);
}

}  // namespace spottune_ext
