// CUDA kernels of spottune_ext::gumbel_st and its backward: one thread per decision. The noise
// comes from injected uniforms or from a Philox stream keyed by a seed read on the device, so
// no host synchronisation is needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gumbel_st_checks.h"
#include "gumbel_st_math.h"

namespace spottune_ext {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename scalar_t, typename acc_t>
__global__ void gumbel_st_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ noise,
                                 const int64_t* __restrict__ seed, int64_t n, acc_t inv_tau, bool sample,
                                 scalar_t* __restrict__ hard, acc_t* __restrict__ soft) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc_t g = 0;
  if (sample) g = logistic_noise<acc_t>(noise ? noise[i] : philox_uniform(*seed, i));
  acc_t h;
  gumbel_decision<acc_t>(logits[2 * i], logits[2 * i + 1], g, inv_tau, &h, &soft[i]);
  hard[i] = static_cast<scalar_t>(h);
}

template <typename scalar_t, typename acc_t>
__global__ void gumbel_st_backward_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ soft,
                                          int64_t n, acc_t inv_tau, scalar_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const acc_t s = soft[i];
  const acc_t d1 = static_cast<acc_t>(grad[i]) * s * (acc_t(1) - s) * inv_tau;
  out[2 * i] = static_cast<scalar_t>(-d1);
  out[2 * i + 1] = static_cast<scalar_t>(d1);
}

std::tuple<at::Tensor, at::Tensor> gumbel_st_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Tensor>& seed, double tau, bool sample) {
  check_gumbel_st_args(logits, noise, seed, tau, sample);
  const bool use_noise = sample && noise.has_value();
  const bool use_seed = sample && !use_noise;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  const auto u = use_noise ? noise->contiguous() : at::Tensor();
  const auto s = use_seed ? seed->contiguous() : at::Tensor();
  const int64_t n = x.size(0) * x.size(1);
  auto hard = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor soft;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_st_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft = at::empty({x.size(0), x.size(1)}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (n == 0) return;
    gumbel_st_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), use_noise ? u.const_data_ptr<float>() : nullptr,
        use_seed ? s.const_data_ptr<int64_t>() : nullptr, n, static_cast<acc_t>(1.0 / tau), sample,
        hard.data_ptr<scalar_t>(), soft.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hard, soft};
}

at::Tensor gumbel_st_backward_cuda(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  check_gumbel_st_backward_args(grad, soft, tau);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  const auto s = soft.contiguous();
  const int64_t n = g.numel();
  auto out = at::empty({g.size(0), g.size(1), 2}, g.options());
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gumbel_st_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gumbel_st_backward_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), n, static_cast<acc_t>(1.0 / tau),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) {
  m.impl("gumbel_st", &gumbel_st_cuda);
  m.impl("gumbel_st_backward", &gumbel_st_backward_cuda);
}

}  // namespace spottune_ext
