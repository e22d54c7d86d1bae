// Per-decision arithmetic of the straight-through Gumbel op, shared by the CPU and CUDA kernels.
// Two-category Gumbel-softmax = one logistic sample: d = l1 - l0 + log(u) - log(1 - u).
// acc_t is float for float32/float16/bfloat16 inputs and double for float64.
#pragma once
#include <cmath>
#include "philox.h"

namespace spottune_ext {

// Keeps log(u / (1 - u)) finite in float32.
constexpr float kUniformEps = 1e-7f;

// log(u) - log(1 - u) with one logarithm.
template <typename acc_t>
SPOTTUNE_HOST_DEVICE acc_t logistic_noise(float u) {
  const acc_t v = static_cast<acc_t>(fminf(fmaxf(u, kUniformEps), 1.0f - kUniformEps));
  return log(v / (acc_t(1) - v));
}

// Writes the hard decision (exactly 0 or 1) and the relaxed one, sigmoid(d / tau).
template <typename acc_t>
SPOTTUNE_HOST_DEVICE void gumbel_decision(acc_t l0, acc_t l1, acc_t noise, acc_t inv_tau, acc_t* hard, acc_t* soft) {
  const acc_t d = (l1 - l0) + noise;
  // NaN when d is NaN (a NaN logit, or two infinite logits of one sign): never a valid route,
  // so route_plan rejects it, on every backend alike.
  *hard = d > acc_t(0) ? acc_t(1) : (d == d ? acc_t(0) : d);
  // Stable sigmoid: exp never overflows, even for logits of +-1e4 at a small tau.
  const acc_t x = d * inv_tau;
  const acc_t e = exp(-fabs(x));
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  *soft = x >= acc_t(0) ? r : e * r;
}

}  // namespace spottune_ext
