// Shared helpers of the route-grouping ops (route_plan, gather_rows, combine_rows), host side.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
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

// The dtypes the kernels are compiled for.
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", s);
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

// The inputs of a route_plan kernel, checked, with the [L, B] outputs allocated.
struct RoutePlanArgs {
  at::Tensor decisions;  // contiguous [B, L]
  int64_t B;
  int64_t L;
  at::Tensor order;  // [L, B] int64
  at::Tensor dest;   // [L, B] int64
};

inline RoutePlanArgs prepare_route_plan(const at::Tensor& decisions) {
  TORCH_CHECK(decisions.dim() == 2, "route_plan: decisions must have shape [B, L], got ", decisions.sizes());
  check_floating("route_plan", "decisions", decisions);
  RoutePlanArgs p;
  p.decisions = decisions.contiguous();
  p.B = p.decisions.size(0);
  p.L = p.decisions.size(1);
  const auto long_opts = p.decisions.options().dtype(at::kLong);
  p.order = at::empty({p.L, p.B}, long_opts);
  p.dest = at::empty({p.L, p.B}, long_opts);
  return p;
}

// The inputs of a gather_rows kernel, checked and in the row layout, with the output allocated.
struct GatherArgs {
  at::Tensor x;      // in the row layout
  at::Tensor index;  // contiguous
  at::Tensor mask;   // in the row layout; undefined without a mask
  at::Tensor out;    // x's shape, in the row layout
  int64_t B;         // rows
  int64_t R;         // elements per row
};

inline GatherArgs prepare_gather_rows(const at::Tensor& x, const at::Tensor& index,
                                      const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() >= 1, "gather_rows: x must have a batch dimension, got a 0-d tensor");
  check_floating("gather_rows", "x", x);
  GatherArgs p;
  p.B = x.size(0);
  check_index("gather_rows", "index", index, x, p.B);
  const auto fmt = row_memory_format(x);
  p.x = x.contiguous(fmt);
  p.index = index.contiguous();
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes(), "gather_rows: mask must have x's shape ", x.sizes(), ", got ",
                mask->sizes());
    check_rows("gather_rows", "mask", *mask, x);
    p.mask = mask->contiguous(fmt);
  }
  p.out = at::empty(x.sizes(), x.options().memory_format(fmt));
  p.R = row_size(x);
  return p;
}

// The inputs of a combine_rows kernel, checked and in the row layout, with the output allocated.
struct CombineArgs {
  at::Tensor src0;      // in the row layout
  at::Tensor src1;      // in the row layout
  at::Tensor dest;      // contiguous
  at::Tensor residual;  // in the row layout; undefined without a residual
  at::Tensor out;       // the combined batch, in the row layout
  int64_t n0;           // rows of src0
  int64_t B;            // rows of src0 and src1
  int64_t R;            // elements per row
};

inline CombineArgs prepare_combine_rows(const at::Tensor& src0, const at::Tensor& src1, const at::Tensor& dest,
                                        const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(src0.dim() >= 1, "combine_rows: src0 must have a batch dimension, got a 0-d tensor");
  check_floating("combine_rows", "src0", src0);
  TORCH_CHECK(src1.dim() == src0.dim() && src1.sizes().slice(1) == src0.sizes().slice(1),
              "combine_rows: src0 and src1 must have the same sample shape, got ", src0.sizes(), " and ",
              src1.sizes());
  check_rows("combine_rows", "src1", src1, src0);
  CombineArgs p;
  p.n0 = src0.size(0);
  p.B = p.n0 + src1.size(0);
  check_index("combine_rows", "dest", dest, src0, p.B);
  auto sizes = src0.sizes().vec();
  sizes[0] = p.B;
  // With src0 empty, src1 alone says which layout the batch is in.
  const auto fmt = row_memory_format(p.n0 ? src0 : src1);
  p.src0 = src0.contiguous(fmt);
  p.src1 = src1.contiguous(fmt);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(sizes), "combine_rows: residual must have shape ",
                at::IntArrayRef(sizes), " (the combined batch), got ", residual->sizes());
    check_rows("combine_rows", "residual", *residual, src0);
    p.residual = residual->contiguous(fmt);
  }
  p.dest = dest.contiguous();
  p.out = at::empty(sizes, src0.options().memory_format(fmt));
  p.R = row_size(src0);
  return p;
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
