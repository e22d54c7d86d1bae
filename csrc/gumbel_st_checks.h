// Argument checks of spottune_ext::gumbel_st and gumbel_st_backward, shared by the CPU and CUDA
// kernels: everything a kernel reads is checked before it touches memory.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <optional>

namespace spottune_ext {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The kernels multiply by 1 / tau in float32 (float64 for float64 logits): it must be finite.
inline void check_tau(const char* op, double tau) {
  TORCH_CHECK(std::isfinite(tau) && tau > 0 && 1.0 / tau <= static_cast<double>(FLT_MAX), op,
              ": tau must be finite and at least 1 / FLT_MAX = ", 1.0 / static_cast<double>(FLT_MAX),
              " (so that 1 / tau is finite in float32), got ", tau);
}

// Every tensor on logits' device: on CUDA a host seed would reach the kernel as a host pointer.
inline void check_gumbel_st_args(const at::Tensor& logits, const std::optional<at::Tensor>& noise,
                                 const std::optional<at::Tensor>& seed, double tau, bool sample) {
  TORCH_CHECK(is_float_type(logits.scalar_type()),
              "gumbel_st: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) == 2, "gumbel_st: logits must have shape [B, L, 2], got ",
              logits.sizes());
  check_tau("gumbel_st", tau);
  if (noise.has_value()) {
    TORCH_CHECK(noise->device() == logits.device(), "gumbel_st: noise must be on logits' device ", logits.device(),
                ", got ", noise->device());
    TORCH_CHECK(noise->scalar_type() == at::kFloat, "gumbel_st: noise must be float32, got ", noise->scalar_type());
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == logits.size(0) && noise->size(1) == logits.size(1),
                "gumbel_st: noise must have shape [B, L] = [", logits.size(0), ", ", logits.size(1), "], got ",
                noise->sizes());
  }
  if (seed.has_value()) {
    TORCH_CHECK(seed->device() == logits.device(), "gumbel_st: seed must be on logits' device ", logits.device(),
                ", got ", seed->device());
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
                "gumbel_st: seed must be one int64 value, got ", seed->scalar_type(), " of shape ", seed->sizes());
  }
  TORCH_CHECK(!sample || noise.has_value() || seed.has_value(), "gumbel_st: sampling needs noise or a seed");
}

// soft: the dtype the forward saved, float32 (float64 for float64 grad).
inline void check_gumbel_st_backward_args(const at::Tensor& grad, const at::Tensor& soft, double tau) {
  TORCH_CHECK(is_float_type(grad.scalar_type()),
              "gumbel_st_backward: grad must be float32, float16, bfloat16 or float64, got ", grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2, "gumbel_st_backward: grad must have shape [B, L], got ", grad.sizes());
  TORCH_CHECK(soft.device() == grad.device(), "gumbel_st_backward: soft must be on grad's device ", grad.device(),
              ", got ", soft.device());
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(soft.scalar_type() == acc, "gumbel_st_backward: soft must be ", acc, " for ", grad.scalar_type(),
              " grad, got ", soft.scalar_type());
  TORCH_CHECK(soft.sizes() == grad.sizes(), "gumbel_st_backward: soft must have grad's shape ", grad.sizes(),
              ", got ", soft.sizes());
  check_tau("gumbel_st_backward", tau);
}

}  // namespace spottune_ext
