// CPU kernel of spottune_ext::route_plan: one prefix sum per block (no sort), blocks in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "row_ops.h"

namespace spottune_ext {
namespace {

// Blocks per task: the scan of one block is a few hundred cheap steps, so split only big plans.
constexpr int64_t kGrainDecisions = 32768;

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan_cpu(const at::Tensor& decisions, bool chain) {
  auto p = prepare_route_plan(decisions);
  const auto& d = p.decisions;
  const int64_t B = p.B;
  const int64_t L = p.L;
  auto& order = p.order;
  auto& dest = p.dest;
  auto counts = at::empty({L + 1}, order.options());
  // position[l, b] = row of image b in block l's order.
  auto position = at::empty({L, B}, order.options());
  std::vector<int64_t> invalid(L, 0);
  const int64_t grain = std::max<int64_t>(1, kGrainDecisions / std::max<int64_t>(B, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "route_plan_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dec = d.const_data_ptr<scalar_t>();
    int64_t* order_ptr = order.data_ptr<int64_t>();
    int64_t* pos_ptr = position.data_ptr<int64_t>();
    int64_t* counts_ptr = counts.data_ptr<int64_t>();
    at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        int64_t chosen = 0;
        int64_t bad = 0;
        for (int64_t b = 0; b < B; ++b) {
          const acc_t v = static_cast<acc_t>(dec[b * L + l]);
          chosen += v != acc_t(0);
          bad += v != acc_t(0) && v != acc_t(1);
        }
        // Stable partition: frozen images keep their rank among frozen ones, fine-tuned images
        // follow all frozen ones in their rank among fine-tuned ones.
        const int64_t n_frozen = B - chosen;
        int64_t rank = 0;  // fine-tuned images seen so far
        for (int64_t b = 0; b < B; ++b) {
          const bool c = static_cast<acc_t>(dec[b * L + l]) != acc_t(0);
          const int64_t p = c ? n_frozen + rank : b - rank;
          rank += c;
          pos_ptr[l * B + b] = p;
          order_ptr[l * B + p] = b;
        }
        counts_ptr[l] = chosen;
        invalid[l] = bad;
      }
    });
    int64_t total_invalid = 0;
    for (int64_t l = 0; l < L; ++l) total_invalid += invalid[l];
    counts_ptr[L] = total_invalid;
  });

  if (!chain || L < 2) {
    dest.copy_(order);
    return {order, dest, counts};
  }
  const int64_t* order_ptr = order.const_data_ptr<int64_t>();
  const int64_t* pos_ptr = position.const_data_ptr<int64_t>();
  int64_t* dest_ptr = dest.data_ptr<int64_t>();
  at::parallel_for(0, L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t i = 0; i < B; ++i) {
        // The last block writes batch positions; every other block writes block l+1's order.
        dest_ptr[l * B + i] = l + 1 < L ? pos_ptr[(l + 1) * B + order_ptr[l * B + i]] : order_ptr[l * B + i];
      }
    }
  });
  return {order, dest, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(spottune_ext, CPU, m) { m.impl("route_plan", &route_plan_cpu); }

}  // namespace spottune_ext
