// CPU kernel of spottune_ext::gather_rows: a sample is one contiguous chunk (NCHW or
// channels_last), so a gather is a row copy (memcpy), or a masked copy for a fused ReLU's backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/row_kernels_cpu.h"
#include "row_ops.h"

namespace spottune_ext {
namespace {

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() >= 1, "gather_rows: x must have a batch dimension, got a 0-d tensor");
  const int64_t B = x.size(0);
  check_index("gather_rows", "index", index, x, B);
  const auto fmt = row_memory_format(x);
  const auto src = x.contiguous(fmt);
  const auto idx = index.contiguous();
  check_permutation("gather_rows", "index", idx);
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes(), "gather_rows: mask must have x's shape ", x.sizes(), ", got ",
                mask->sizes());
    check_rows("gather_rows", "mask", *mask, x);
    m = mask->contiguous(fmt);
  }
  auto out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t R = row_size(x);
  const int64_t* idx_ptr = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cpu", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    const scalar_t* mk = m.defined() ? m.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_row_chunk(B, R, sizeof(scalar_t), [&](int64_t row, int64_t begin, int64_t end) {
      const int64_t from = idx_ptr[row] * R + begin;
      if (mk) {
        masked_copy(in + from, mk + from, o + row * R + begin, end - begin);
      } else {
        std::memcpy(o + row * R + begin, in + from, (end - begin) * sizeof(scalar_t));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CPU, m) { m.impl("gather_rows", &gather_rows_cpu); }

}  // namespace spottune_ext
