// CUDA kernel of spottune_ext::route_plan: one launch plans every block, one CTA per block
// (a block-wide prefix sum over the batch in tiles, no sort), so the plan costs one launch and the
// counts reach the host in one copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "row_ops.h"

namespace spottune_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__device__ __forceinline__ int64_t is_chosen(const scalar_t* d, int64_t b, int64_t L, int64_t col) {
  return static_cast<at::opmath_type<scalar_t>>(d[b * L + col]) != at::opmath_type<scalar_t>(0);
}

// CTA l writes order[l], dest[l], counts[l], and adds block l's invalid decisions to counts[L]
// (an integer sum, so the same in any order; counts starts at zero).
template <typename scalar_t>
__global__ void route_plan_kernel(const scalar_t* __restrict__ d, int64_t B, int64_t L, bool chain,
                                  int64_t* __restrict__ order, int64_t* __restrict__ dest,
                                  int64_t* __restrict__ counts) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int64_t n_chosen[2];
  const int64_t l = blockIdx.x;
  // With chain, block l+1's partition says where each image goes next; the last block writes
  // batch positions. has_next is the same for the whole CTA, so the barriers below are uniform.
  const bool has_next = chain && l + 1 < L;

  // Pass 1: fine-tuned images of block l (and of block l+1), invalid decisions of block l.
  int64_t chosen = 0, chosen_next = 0, invalid = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    const acc_t v = static_cast<acc_t>(d[b * L + l]);
    chosen += v != acc_t(0);
    invalid += v != acc_t(0) && v != acc_t(1);
    if (has_next) chosen_next += is_chosen(d, b, L, l + 1);
  }
  chosen = Reduce(tmp.reduce).Sum(chosen);  // valid in thread 0
  __syncthreads();
  chosen_next = Reduce(tmp.reduce).Sum(chosen_next);
  __syncthreads();
  invalid = Reduce(tmp.reduce).Sum(invalid);
  if (threadIdx.x == 0) {
    n_chosen[0] = chosen;
    n_chosen[1] = chosen_next;
    counts[l] = chosen;
    if (invalid) atomicAdd(reinterpret_cast<unsigned long long*>(counts + L), static_cast<unsigned long long>(invalid));
  }
  __syncthreads();
  const int64_t n_frozen = B - n_chosen[0];
  const int64_t n_frozen_next = B - n_chosen[1];

  // Pass 2: stable partition, kThreads images at a time. A frozen image's row is its rank among
  // frozen images; a fine-tuned image's row is n_frozen + its rank among fine-tuned images.
  int64_t carry = 0, carry_next = 0;  // fine-tuned images in earlier tiles
  for (int64_t start = 0; start < B; start += kThreads) {
    const int64_t b = start + threadIdx.x;
    const bool in_batch = b < B;
    const int64_t c = in_batch ? is_chosen(d, b, L, l) : 0;
    int64_t rank, tile_chosen;
    Scan(tmp.scan).ExclusiveSum(c, rank, tile_chosen);
    __syncthreads();
    const int64_t pos = c ? n_frozen + carry + rank : b - (carry + rank);
    carry += tile_chosen;
    int64_t target = b;
    if (has_next) {
      const int64_t cn = in_batch ? is_chosen(d, b, L, l + 1) : 0;
      int64_t rank_next, tile_chosen_next;
      Scan(tmp.scan).ExclusiveSum(cn, rank_next, tile_chosen_next);
      __syncthreads();
      target = cn ? n_frozen_next + carry_next + rank_next : b - (carry_next + rank_next);
      carry_next += tile_chosen_next;
    }
    if (in_batch) {
      order[l * B + pos] = b;
      dest[l * B + pos] = target;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan_cuda(const at::Tensor& decisions, bool chain) {
  const c10::cuda::CUDAGuard guard(decisions.device());
  auto p = prepare_route_plan(decisions);
  // Zeroed: the kernel adds each block's invalid decisions to counts[L].
  auto counts = at::zeros({p.L + 1}, p.order.options());
  if (p.L == 0) return {p.order, p.dest, counts};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.decisions.scalar_type(), "route_plan_cuda", [&] {
    route_plan_kernel<scalar_t><<<static_cast<unsigned int>(p.L), kThreads, 0, stream>>>(
        p.decisions.const_data_ptr<scalar_t>(), p.B, p.L, chain, p.order.data_ptr<int64_t>(),
        p.dest.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p.order, p.dest, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CUDA, m) { m.impl("route_plan", &route_plan_cuda); }

}  // namespace spottune_ext
