// Device helpers shared by the CUDA row kernels (gather_rows, combine_rows): each thread moves
// one pack of VEC elements (16 bytes when the rows allow it) of a sample; blockIdx.x picks the
// chunk of the sample, blockIdx.y the sample.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace spottune_ext
