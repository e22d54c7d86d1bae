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
  TORCH_CHECK(x.dim() >= 1, "gather_rows: x must have a batch dimension, got a 0-d tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0);
  check_index("gather_rows", "index", index, x, B);
  const auto fmt = row_memory_format(x);
  const auto src = x.contiguous(fmt);
  const auto idx = index.contiguous();
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes(), "gather_rows: mask must have x's shape ", x.sizes(), ", got ",
                mask->sizes());
    check_rows("gather_rows", "mask", *mask, x);
    m = mask->contiguous(fmt);
  }
  auto out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t R = row_size(x);
  if (B == 0 || R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cuda", [&] {
    const void* mask_ptr = m.defined() ? m.const_data_ptr() : nullptr;
    if (use_wide_packs<scalar_t>(R, {src.const_data_ptr(), mask_ptr, out.const_data_ptr()})) {
      launch<scalar_t, 16 / sizeof(scalar_t)>(src, idx, m, out, B, R);
    } else {
      launch<scalar_t, 1>(src, idx, m, out, B, R);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) { m.impl("gather_rows", &gather_rows_cuda); }

}  // namespace spottune_ext
