// CUDA kernel of spottune_ext::gather_rows: out[i] = x[index[i]], a sample being one contiguous
// chunk (NCHW or channels_last), copied in 16-byte packs; with mask, zeroed where mask <= 0.
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

template <typename scalar_t, int VEC, bool kMask>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ index,
                                   const scalar_t* __restrict__ mask, scalar_t* __restrict__ out, int64_t B,
                                   int64_t R) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (j >= R) return;
  for (int64_t row = blockIdx.y; row < B; row += gridDim.y) {
    const int64_t src = index[row];
    CUDA_KERNEL_ASSERT(src >= 0 && src < B);
    auto v = load_pack<scalar_t, VEC>(x + src * R + j);
    if constexpr (kMask) {
      const auto m = load_pack<scalar_t, VEC>(mask + src * R + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (!(static_cast<acc_t>(m.v[k]) > acc_t(0))) v.v[k] = static_cast<scalar_t>(acc_t(0));
      }
    }
    store_pack<scalar_t, VEC>(out + row * R + j, v);
  }
}

template <typename scalar_t, int VEC>
void launch(const at::Tensor& x, const at::Tensor& index, const at::Tensor& mask, at::Tensor& out, int64_t B,
            int64_t R) {
  const dim3 grid = row_grid(B, R, VEC);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (mask.defined()) {
    gather_rows_kernel<scalar_t, VEC, true><<<grid, kRowThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), mask.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), B, R);
  } else {
    gather_rows_kernel<scalar_t, VEC, false><<<grid, kRowThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), nullptr, out.data_ptr<scalar_t>(), B, R);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto p = prepare_gather_rows(x, index, mask);
  check_permutation_cuda(p.index);
  if (p.B == 0 || p.R == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cuda", [&] {
    const void* mask_ptr = p.mask.defined() ? p.mask.const_data_ptr() : nullptr;
    if (use_wide_packs<scalar_t>(p.R, {p.x.const_data_ptr(), mask_ptr, p.out.const_data_ptr()})) {
      launch<scalar_t, 16 / sizeof(scalar_t)>(p.x, p.index, p.mask, p.out, p.B, p.R);
    } else {
      launch<scalar_t, 1>(p.x, p.index, p.mask, p.out, p.B, p.R);
    }
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) { m.impl("gather_rows", &gather_rows_cuda); }

}  // namespace spottune_ext
