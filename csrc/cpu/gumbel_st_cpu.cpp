// CPU kernels of spottune_ext::gumbel_st and its backward: one pass over the decisions, in
// chunks. Per chunk, a scalar loop loads logits and draws uniforms (one Philox evaluation per
// four decisions), then the logarithm, exponential and select run eight-wide with AVX2 (SLEEF,
// which libtorch ships) when the processor has it, branch-free either way: random decisions
// would otherwise mispredict a branch or two per element.
#if defined(__x86_64__)
// libtorch exports SLEEF's AVX2 functions; sleef.h declares them only when the whole file is
// compiled for AVX2, which this one is not (it runs on any x86-64 and checks at run time).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>
extern "C" {
__m256 Sleef_expf8_u10avx2(__m256);
__m256 Sleef_logf8_u10avx2(__m256);
}
#pragma GCC pop_options
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gumbel_st_checks.h"
#include "gumbel_st_math.h"

namespace spottune_ext {
namespace {

// Multiple of 4 (one Philox evaluation serves four decisions) and of the vector width.
constexpr int64_t kChunk = 256;
// Threads pay off only for large batches: waking them costs more than a few thousand decisions.
constexpr int64_t kGrain = 32768;

// soft[k] = sigmoid(d[k] * inv_tau) and hard[k] = d[k] > 0 for one chunk, d already holding l1 - l0 + noise.
void relax_scalar(const float* d, int64_t n, float inv_tau, float* hard, float* soft) {
  for (int64_t k = 0; k < n; ++k) gumbel_decision<float>(0.0f, d[k], 0.0f, inv_tau, &hard[k], &soft[k]);
}

void logistic_scalar(const float* u, int64_t n, float* d) {
  for (int64_t k = 0; k < n; ++k) d[k] += logistic_noise<float>(u[k]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void relax_avx2(const float* d, int64_t n, float inv_tau, float* hard,
                                                    float* soft) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), scale = _mm256_set1_ps(inv_tau);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 dv = _mm256_loadu_ps(d + k);
    const __m256 x = _mm256_mul_ps(dv, scale);
    const __m256 e = Sleef_expf8_u10avx2(_mm256_or_ps(x, sign));  // exp(-|x|)
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    _mm256_storeu_ps(soft + k, _mm256_blendv_ps(_mm256_mul_ps(e, r), r, _mm256_cmp_ps(x, zero, _CMP_GE_OQ)));
    // 1 where d > 0, NaN where d is NaN (as gumbel_decision), else 0.
    const __m256 h = _mm256_and_ps(_mm256_cmp_ps(dv, zero, _CMP_GT_OQ), one);
    _mm256_storeu_ps(hard + k, _mm256_blendv_ps(h, dv, _mm256_cmp_ps(dv, dv, _CMP_UNORD_Q)));
  }
  relax_scalar(d + k, n - k, inv_tau, hard + k, soft + k);
}

__attribute__((target("avx2,fma"))) void logistic_avx2(const float* u, int64_t n, float* d) {
  const __m256 one = _mm256_set1_ps(1.0f), lo = _mm256_set1_ps(kUniformEps), hi = _mm256_set1_ps(1.0f - kUniformEps);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(u + k), lo), hi);
    const __m256 g = Sleef_logf8_u10avx2(_mm256_div_ps(v, _mm256_sub_ps(one, v)));
    _mm256_storeu_ps(d + k, _mm256_add_ps(_mm256_loadu_ps(d + k), g));
  }
  logistic_scalar(u + k, n - k, d + k);
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
constexpr bool kHasAvx2 = false;
#endif

void relax(const float* d, int64_t n, float inv_tau, float* hard, float* soft) {
#if defined(__x86_64__)
  if (kHasAvx2) return relax_avx2(d, n, inv_tau, hard, soft);
#endif
  relax_scalar(d, n, inv_tau, hard, soft);
}

void logistic(const float* u, int64_t n, float* d) {
#if defined(__x86_64__)
  if (kHasAvx2) return logistic_avx2(u, n, d);
#endif
  logistic_scalar(u, n, d);
}

// float32 / float16 / bfloat16 logits: float arithmetic, chunked and vectorised.
template <typename scalar_t>
void gumbel_st_float(const scalar_t* logits, const float* noise, const int64_t* seed, int64_t n, float inv_tau,
                     bool sample, scalar_t* hard_out, float* soft) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    float d[kChunk], u[kChunk], hard[kChunk];
    uint32_t words[4];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t m = std::min(kChunk, end - start);
      for (int64_t k = 0; k < m; ++k) {
        d[k] = static_cast<float>(logits[2 * (start + k) + 1]) - static_cast<float>(logits[2 * (start + k)]);
      }
      if (sample) {
        if (noise) {
          std::copy(noise + start, noise + start + m, u);
        } else {
          for (int64_t k = 0; k < m; ++k) {
            const int64_t i = start + k;
            if (k == 0 || (i & 3) == 0) philox4(*seed, static_cast<uint32_t>(i >> 2), words);
            u[k] = uint_to_uniform(words[i & 3]);
          }
        }
        logistic(u, m, d);
      }
      relax(d, m, inv_tau, hard, soft + start);
      for (int64_t k = 0; k < m; ++k) hard_out[start + k] = static_cast<scalar_t>(hard[k]);
    }
  });
}

// float64 logits (gradcheck): double arithmetic, scalar.
void gumbel_st_double(const double* logits, const float* noise, const int64_t* seed, int64_t n, double inv_tau,
                      bool sample, double* hard, double* soft) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double g = 0;
      if (sample) g = logistic_noise<double>(noise ? noise[i] : philox_uniform(*seed, i));
      gumbel_decision<double>(logits[2 * i], logits[2 * i + 1], g, inv_tau, &hard[i], &soft[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gumbel_st_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Tensor>& seed, double tau, bool sample) {
  check_gumbel_st_args(logits, noise, seed, tau, sample);
  const bool use_noise = sample && noise.has_value();
  const bool use_seed = sample && !use_noise;
  const auto x = logits.contiguous();
  const auto u = use_noise ? noise->contiguous() : at::Tensor();
  const int64_t seed_value = use_seed ? seed->item<int64_t>() : 0;
  const float* u_ptr = use_noise ? u.const_data_ptr<float>() : nullptr;
  const int64_t* seed_ptr = use_seed ? &seed_value : nullptr;
  const int64_t n = x.size(0) * x.size(1);
  auto hard = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kDouble) {
    auto soft = at::empty_like(hard);
    gumbel_st_double(x.const_data_ptr<double>(), u_ptr, seed_ptr, n, 1.0 / tau, sample, hard.data_ptr<double>(),
                     soft.data_ptr<double>());
    return {hard, soft};
  }
  auto soft = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_st_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gumbel_st_float<scalar_t>(x.const_data_ptr<scalar_t>(), u_ptr, seed_ptr, n, static_cast<float>(1.0 / tau),
                                sample, hard.data_ptr<scalar_t>(), soft.data_ptr<float>());
    }
  });
  return {hard, soft};
}

at::Tensor gumbel_st_backward_cpu(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  check_gumbel_st_backward_args(grad, soft, tau);
  const auto g = grad.contiguous();
  const auto s = soft.contiguous();
  const int64_t n = g.numel();
  auto out = at::empty({g.size(0), g.size(1), 2}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gumbel_st_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
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
