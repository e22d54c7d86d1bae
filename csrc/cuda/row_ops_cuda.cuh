// Device helpers shared by the CUDA row kernels (gather_rows, combine_rows): each thread moves
// one pack of VEC elements (16 bytes when the rows allow it) of a sample; blockIdx.x picks the
// chunk of the sample, blockIdx.y the sample.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace spottune_ext {

constexpr int kRowThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// 16-byte packs when every row starts 16-byte aligned, else one element per thread.
template <typename scalar_t>
bool use_wide_packs(int64_t row_elems, std::initializer_list<const void*> ptrs) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  if (row_elems % vec != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

inline dim3 row_grid(int64_t rows, int64_t row_elems, int vec) {
  const int64_t per_block = static_cast<int64_t>(kRowThreads) * vec;
  return dim3(static_cast<unsigned int>((row_elems + per_block - 1) / per_block),
              static_cast<unsigned int>(std::min(rows, kMaxGridY)));
}

namespace {

// Permutation check on the device, without a host synchronisation: counts every index value,
// then asserts each of range(n) was seen once. A failure is a device-side assertion (the CUDA
// context is then unusable, as with any device assert); the CPU kernels raise instead.
__global__ void count_index_kernel(const int64_t* __restrict__ index, int64_t n, int* __restrict__ seen) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t v = index[i];
  CUDA_KERNEL_ASSERT_MSG(v >= 0 && v < n, "spottune_ext row op: index/dest value out of range (not a permutation)");
  atomicAdd(seen + v, 1);
}

__global__ void check_seen_once_kernel(const int* __restrict__ seen, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  CUDA_KERNEL_ASSERT_MSG(seen[i] == 1, "spottune_ext row op: index/dest value repeated (not a permutation)");
}

inline void check_permutation_cuda(const at::Tensor& index) {
  const int64_t n = index.numel();
  if (n == 0) return;
  auto seen = at::zeros({n}, index.options().dtype(at::kInt));
  const unsigned int blocks = static_cast<unsigned int>((n + kRowThreads - 1) / kRowThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  count_index_kernel<<<blocks, kRowThreads, 0, stream>>>(index.const_data_ptr<int64_t>(), n, seen.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  check_seen_once_kernel<<<blocks, kRowThreads, 0, stream>>>(seen.const_data_ptr<int>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

}  // namespace spottune_ext
