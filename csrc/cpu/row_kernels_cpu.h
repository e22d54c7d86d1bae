// Element loops of the CPU row kernels (gather_rows, combine_rows). float and double loops are
// plain loops the compiler vectorises; the half types avoid per-element software conversions,
// which would be slower than the memory traffic: masks and ReLU work on the bits, and the fp16
// add uses the F16C conversion instructions when the CPU has them (checked at run time).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPOTTUNE_X86_F16C 1
#endif

namespace spottune_ext {

template <typename scalar_t>
constexpr bool kHalfType = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// Bits of +inf: a half-type value v > 0 exactly when its bits, read as int16, are in (0, +inf].
template <typename scalar_t>
constexpr int16_t kPosInfBits = std::is_same_v<scalar_t, c10::Half> ? 0x7C00 : 0x7F80;

// out = x where mask > 0, else +0. x is loaded unconditionally so the ternary is a select the
// compiler vectorises, not a branch.
template <typename scalar_t>
void masked_copy(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mask, scalar_t* __restrict__ out,
                 int64_t n) {
  if constexpr (kHalfType<scalar_t>) {
    const auto* xb = reinterpret_cast<const int16_t*>(x);
    const auto* mb = reinterpret_cast<const int16_t*>(mask);
    auto* ob = reinterpret_cast<int16_t*>(out);
    for (int64_t j = 0; j < n; ++j) {
      const int16_t v = xb[j];
      ob[j] = mb[j] > 0 && mb[j] <= kPosInfBits<scalar_t> ? v : int16_t(0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t v = x[j];
      out[j] = mask[j] > scalar_t(0) ? v : scalar_t(0);
    }
  }
}

// out = act(src + residual), computed in the op-math type and rounded once.
template <typename scalar_t, bool kResidual, bool kRelu>
void add_act(const scalar_t* __restrict__ src, const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
             int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    acc_t v = static_cast<acc_t>(src[j]);
    if constexpr (kResidual) v += static_cast<acc_t>(residual[j]);
    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN passes through, as in torch.relu
    out[j] = static_cast<scalar_t>(v);
  }
}

// out = relu(src) (NaN passes through, -0 may stay -0, which compares equal to 0).
template <typename scalar_t>
void relu_copy(const scalar_t* __restrict__ src, scalar_t* __restrict__ out, int64_t n) {
  if constexpr (kHalfType<scalar_t>) {
    const auto* sb = reinterpret_cast<const int16_t*>(src);
    auto* ob = reinterpret_cast<int16_t*>(out);
    for (int64_t j = 0; j < n; ++j) {
      const int16_t v = sb[j];
      // Negative and not NaN: sign bit set, magnitude bits at most those of inf.
      const bool negative = v < 0 && (v & 0x7FFF) <= kPosInfBits<scalar_t>;
      ob[j] = negative ? int16_t(0) : v;
    }
  } else {
    add_act<scalar_t, false, true>(src, nullptr, out, n);
  }
}

#ifdef SPOTTUNE_X86_F16C
inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

// fp16 out = act(src + residual) eight at a time: exact widening, float32 add, one rounding to
// nearest even, as torch computes it.
template <bool kRelu>
__attribute__((target("avx,f16c"))) void add_act_f16c(const c10::Half* src, const c10::Half* residual,
                                                       c10::Half* out, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    v = _mm256_add_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(residual + j))));
    if constexpr (kRelu) v = _mm256_max_ps(zero, v);  // returns v when v is NaN: NaN passes through
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  add_act<c10::Half, true, kRelu>(src + j, residual + j, out + j, n - j);
}
#endif

// One row chunk of combine_rows: out = act(src + residual) (residual may be null).
template <typename scalar_t>
void combine_chunk(const scalar_t* src, const scalar_t* residual, scalar_t* out, int64_t n, bool relu) {
  if (!residual) {
    if (relu) {
      relu_copy(src, out, n);
    } else {
      std::memcpy(out, src, n * sizeof(scalar_t));
    }
    return;
  }
#ifdef SPOTTUNE_X86_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (cpu_has_f16c()) {
      if (relu) {
        add_act_f16c<true>(src, residual, out, n);
      } else {
        add_act_f16c<false>(src, residual, out, n);
      }
      return;
    }
  }
#endif
  if (relu) {
    add_act<scalar_t, true, true>(src, residual, out, n);
  } else {
    add_act<scalar_t, true, false>(src, residual, out, n);
  }
}

}  // namespace spottune_ext
