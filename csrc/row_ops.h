// Shared helpers of the route-grouping ops (route_plan, gather_rows, combine_rows), host side.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace spottune_ext {

// The layout a row op writes: channels_last for a 4-D tensor that is channels_last-contiguous
// (and not also NCHW-contiguous), otherwise the default contiguous layout. In both, one sample
// is one contiguous chunk of memory, so moving a sample is a row copy. Mirrors
// spottune_ext.reference._memory_format.
inline at::MemoryFormat row_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Elements per sample: the product of every dimension but the first.
inline int64_t row_size(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

inline void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

inline void check_index(const char* op, const char* name, const at::Tensor& index, const at::Tensor& like,
                        int64_t rows) {
  TORCH_CHECK(index.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
              index.device());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == rows, op, ": ", name, " must have shape [", rows,
              "] (one entry per sample), got ", index.sizes());
}

// Checks on the host that index holds every value of range(n) once (a contiguous CPU int64
// tensor): O(n) for a batch-sized index, negligible next to moving the samples.
inline void check_permutation(const char* op, const char* name, const at::Tensor& index) {
  const int64_t n = index.numel();
  const int64_t* p = index.const_data_ptr<int64_t>();
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = p[i];
    TORCH_CHECK(v >= 0 && v < n, op, ": ", name, " must be a permutation of range(", n, "), but ", name, "[", i,
                "] = ", v, " is out of range");
    TORCH_CHECK(!seen[v], op, ": ", name, " must be a permutation of range(", n, "), but ", v, " appears twice");
    seen[v] = 1;
  }
}

// Work split of the CPU row kernels: every (sample, chunk) pair is one work item, so a small
// batch of large samples still keeps every thread busy; small tensors stay on one thread.
constexpr int64_t kChunkBytes = 64 * 1024;
constexpr int64_t kParallelBytes = 256 * 1024;

// Calls fn(row, begin, end) for consecutive element ranges [begin, end) of every row.
template <typename F>
void for_each_row_chunk(int64_t rows, int64_t row_elems, int64_t elem_bytes, const F& fn) {
  if (rows == 0 || row_elems == 0) return;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / elem_bytes);
  const int64_t chunks = (row_elems + chunk - 1) / chunk;
  const int64_t items = rows * chunks;
  const int64_t grain = rows * row_elems * elem_bytes < kParallelBytes ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks;
      const int64_t first = (item % chunks) * chunk;
      fn(row, first, std::min(first + chunk, row_elems));
    }
  });
}

}  // namespace spottune_ext
