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
  const auto p = prepare_combine_rows(src0, src1, dest, residual);
  check_permutation("combine_rows", "dest", p.dest);
  const int64_t n0 = p.n0;
  const int64_t R = p.R;
  const int64_t* dest_ptr = p.dest.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src0.scalar_type(), "combine_rows_cpu", [&] {
    const scalar_t* a_ptr = p.src0.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = p.src1.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = p.residual.defined() ? p.residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = p.out.data_ptr<scalar_t>();
    for_each_row_chunk(p.B, R, sizeof(scalar_t), [&](int64_t row, int64_t begin, int64_t end) {
      const scalar_t* s = (row < n0 ? a_ptr + row * R : b_ptr + (row - n0) * R) + begin;
      const scalar_t* res = r_ptr ? r_ptr + row * R + begin : nullptr;
      scalar_t* to = o + dest_ptr[row] * R + begin;
      combine_chunk(s, res, to, end - begin, relu);
    });
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CPU, m) { m.impl("combine_rows", &combine_rows_cpu); }

}  // namespace spottune_ext
