// CPU kernel of spottune_ext::combine_rows: writes row i of cat(src0, src1), plus residual row i
// and a ReLU when asked, straight to output row dest[i], in one pass over memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/row_kernels_cpu.h"
#include "row_ops.h"

namespace spottune_ext {
namespace {

at::Tensor combine_rows_cpu(const at::Tensor& src0, const at::Tensor& src1, const at::Tensor& dest,
                            const std::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(src0.dim() >= 1, "combine_rows: src0 must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(src1.dim() == src0.dim() && src1.sizes().slice(1) == src0.sizes().slice(1),
              "combine_rows: src0 and src1 must have the same sample shape, got ", src0.sizes(), " and ",
              src1.sizes());
  check_rows("combine_rows", "src1", src1, src0);
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
  check_permutation("combine_rows", "dest", d);
  auto out = at::empty(sizes, src0.options().memory_format(fmt));
  const int64_t R = row_size(src0);
  const int64_t* dest_ptr = d.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src0.scalar_type(), "combine_rows_cpu", [&] {
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_row_chunk(B, R, sizeof(scalar_t), [&](int64_t row, int64_t begin, int64_t end) {
      const scalar_t* s = (row < n0 ? a_ptr + row * R : b_ptr + (row - n0) * R) + begin;
      const scalar_t* res = r_ptr ? r_ptr + row * R + begin : nullptr;
      scalar_t* to = o + dest_ptr[row] * R + begin;
      combine_chunk(s, res, to, end - begin, relu);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CPU, m) { m.impl("combine_rows", &combine_rows_cpu); }

}  // namespace spottune_ext
