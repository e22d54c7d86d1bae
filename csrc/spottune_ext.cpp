// Every spottune_ext op schema is declared here, once. CPU kernels live in csrc/cpu/, CUDA
// kernels in csrc/cuda/; each registers itself for its dispatch key with TORCH_LIBRARY_IMPL.
// The Python layer (spottune_ext/ops/) adds fake and autograd registrations, and the Triton
// variants (name suffix "_triton") copy these schemas at import time.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import spottune_ext._C` load this library (and run the registrations below).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(spottune_ext, m) {
  // Straight-through Gumbel decision for two routes. logits [B, L, 2]; noise: optional uniform
  // samples [B, L] (float32, in (0, 1)); seed: optional int64 scalar tensor on logits' device
  // keying a Philox stream (used when sample and no noise). Returns (hard [B, L] in logits'
  // dtype, soft [B, L] float32 saved for the backward).
  m.def("gumbel_st(Tensor logits, Tensor? noise, Tensor? seed, float tau, bool sample) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // grad [B, L], soft [B, L] float32 -> grad_logits [B, L, 2] in grad's dtype.
  m.def("gumbel_st_backward(Tensor grad, Tensor soft, float tau) -> Tensor", {at::Tag::pt2_compliant_tag});

  // Stable two-way partition of the batch for every block at once, from decisions [B, L] (0/1).
  // Returns order [L, B] int64 (block l's frozen images, then its fine-tuned ones, each in batch
  // order), dest [L, B] int64 (where row i of block l's output goes: its batch position, or with
  // chain its position in block l+1's order, the last block going to batch positions), and
  // counts [L + 1] int64 (counts[l] = images routed to the fine-tuned copy of block l;
  // counts[L] = decisions that are neither 0 nor 1).
  m.def("route_plan(Tensor decisions, bool chain) -> (Tensor, Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  // out[i] = x[index[i]] for whole samples (memory format kept); with mask, zeroed where mask[index[i]] <= 0.
  // index is a permutation of range(B).
  m.def("gather_rows(Tensor x, Tensor index, Tensor? mask) -> Tensor", {at::Tag::pt2_compliant_tag});
  // out[dest[i]] = act(row i of cat(src0, src1) + residual[i]); dest is a permutation of the batch.
  m.def("combine_rows(Tensor src0, Tensor src1, Tensor dest, Tensor? residual, bool relu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
