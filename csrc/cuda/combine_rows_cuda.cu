// CUDA kernel of spottune_ext::combine_rows: row i of cat(src0, src1), plus residual row i and a
// ReLU when asked, written straight to output row dest[i] in 16-byte packs (one pass over memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "row_ops_cuda.cuh"
#include "row_ops.h"

namespace spottune_ext {
namespace {

template <typename scalar_t, int VEC, bool kResidual, bool kRelu>
__global__ void combine_rows_kernel(const scalar_t* __restrict__ src0, const scalar_t* __restrict__ src1,
                                    const int64_t* __restrict__ dest, const scalar_t* __restrict__ residual,
                                    scalar_t* __restrict__ out, int64_t n0, int64_t B, int64_t R) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (j >= R) return;
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    const int64_t to = dest[row];
    CUDA_KERNEL_ASSERT(to >= 0 && to < B);
    auto v = load_pack<scalar_t, VEC>((row < n0 ? src0 + row * R : src1 + (row - n0) * R) + j);
    if constexpr (kResidual || kRelu) {
      Pack<scalar_t, VEC> r;
      if constexpr (kResidual) r = load_pack<scalar_t, VEC>(residual + row * R + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t a = static_cast<acc_t>(v.v[k]);
        if constexpr (kResidual) a += static_cast<acc_t>(r.v[k]);
        if constexpr (kRelu) a = a < acc_t(0) ? acc_t(0) : a;  // NaN passes through, as in torch.relu
        v.v[k] = static_cast<scalar_t>(a);
      }
    }
    store_pack<scalar_t, VEC>(out + to * R + j, v);
  }
}

template <typename scalar_t, int VEC, bool kResidual, bool kRelu>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& dest, const at::Tensor& residual,
            at::Tensor& out, int64_t n0, int64_t B, int64_t R) {
  combine_rows_kernel<scalar_t, VEC, kResidual, kRelu>
      <<<row_grid(B, R, VEC), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), dest.const_data_ptr<int64_t>(),
          kResidual ? residual.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), n0, B, R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& dest, const at::Tensor& residual,
            bool relu, at::Tensor& out, int64_t n0, int64_t B, int64_t R) {
  if (residual.defined() && relu) {
    launch<scalar_t, VEC, true, true>(a, b, dest, residual, out, n0, B, R);
  } else if (residual.defined()) {
    launch<scalar_t, VEC, true, false>(a, b, dest, residual, out, n0, B, R);
  } else if (relu) {
    launch<scalar_t, VEC, false, true>(a, b, dest, residual, out, n0, B, R);
  } else {
    launch<scalar_t, VEC, false, false>(a, b, dest, residual, out, n0, B, R);
  }
}

at::Tensor combine_rows_cuda(const at::Tensor& src0, const at::Tensor& src1, const at::Tensor& dest,
                             const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(src0.dim() >= 1, "combine_rows: src0 must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(src1.dim() == src0.dim() && src1.sizes().slice(1) == src0.sizes().slice(1),
              "combine_rows: src0 and src1 must have the same sample shape, got ", src0.sizes(), " and ",
              src1.sizes());
  check_rows("combine_rows", "src1", src1, src0);
  const c10::cuda::CUDAGuard guard(src0.device());
  const int64_t n0 = src0.size(0);
  const int64_t B = n0 + src1.size(0);
  check_index("combine_rows", "dest", dest, src0, B);
  auto sizes = src0.sizes().vec();
  sizes[0] = B;
  const auto fmt = row_memory_format(n0 ? src0 : src1);
  const auto a = src0.contiguous(fmt);
  const auto b = src1.contiguous(fmt);
  at::Tensor r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(sizes), "combine_rows: residual must have shape ",
                at::IntArrayRef(sizes), " (the combined batch), got ", residual->sizes());
    check_rows("combine_rows", "residual", *residual, src0);
    r = residual->contiguous(fmt);
  }
  const auto d = dest.contiguous();
  auto out = at::empty(sizes, src0.options().memory_format(fmt));
  const int64_t R = row_size(src0);
  if (B == 0 || R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src0.scalar_type(), "combine_rows_cuda", [&] {
    const void* r_ptr = r.defined() ? r.const_data_ptr() : nullptr;
    if (use_wide_packs<scalar_t>(R, {a.const_data_ptr(), b.const_data_ptr(), r_ptr, out.const_data_ptr()})) {
      launch<scalar_t, 16 / sizeof(scalar_t)>(a, b, d, r, relu, out, n0, B, R);
    } else {
      launch<scalar_t, 1>(a, b, d, r, relu, out, n0, B, R);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) { m.impl("combine_rows", &combine_rows_cuda); }

}  // namespace spottune_ext
