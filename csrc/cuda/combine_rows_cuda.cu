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
  const c10::cuda::CUDAGuard guard(src0.device());
  auto p = prepare_combine_rows(src0, src1, dest, residual);
  check_permutation_cuda(p.dest);
  if (p.B == 0 || p.R == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src0.scalar_type(), "combine_rows_cuda", [&] {
    const void* r_ptr = p.residual.defined() ? p.residual.const_data_ptr() : nullptr;
    if (use_wide_packs<scalar_t>(
            p.R, {p.src0.const_data_ptr(), p.src1.const_data_ptr(), r_ptr, p.out.const_data_ptr()})) {
      launch<scalar_t, 16 / sizeof(scalar_t)>(p.src0, p.src1, p.dest, p.residual, relu, p.out, p.n0, p.B, p.R);
    } else {
      launch<scalar_t, 1>(p.src0, p.src1, p.dest, p.residual, relu, p.out, p.n0, p.B, p.R);
    }
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) { m.impl("combine_rows", &combine_rows_cuda); }

}  // namespace spottune_ext
