"""spottune_ext.gather_rows: reorder the samples of a batch (whole-sample row copies)."""
from typing import Optional

import torch

from .. import _checks, _library, backends, reference


def _torch(x, index, mask):
    _checks.permutation("gather_rows", "index", index)  # index_select would not see a repeat
    return reference.gather_rows(x, index, mask)


def _load_triton():
    from ..triton import gather_rows as kernels
    _library.define_triton_variant("gather_rows", kernels.gather_rows)
    _library.register_fake(["gather_rows_triton"], _fake)
    _library.register_autograd(["gather_rows_triton"], _make_backward("triton"), _setup_context)
    return _library.op("gather_rows_triton")


def _fake(x, index, mask):
    return torch.empty_like(x, memory_format=reference.row_memory_format(x))


def _setup_context(ctx, inputs, output):
    _, index, mask = inputs
    ctx.save_for_backward(index, mask)


def _make_backward(backend):
    def backward(ctx, grad):
        index, mask = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # index is a permutation, so the gradient of the gather is the scatter grad_x[index[i]] = grad[i]
        # (combine_rows is looked up here: spottune_ext/ops/combine_rows.py registers it).
        grad_x = backends.kernel("combine_rows", backend)(grad, grad[:0], index, None, False)
        if mask is not None:
            grad_x = torch.where(mask > 0, grad_x, 0)
        return grad_x, None, None  # the mask only gates: zero gradient almost everywhere
    return backward


_library.register_fake(["gather_rows"], _fake)
# The compiled op is one op for its CPU and CUDA kernels: its backward calls the compiled combine_rows.
_library.register_autograd(["gather_rows"], _make_backward("cpp"), _setup_context)
backends.register("gather_rows", {"torch": _torch, "cpp": _library.op("gather_rows"),
                                  "cuda": _library.op("gather_rows")}, {"triton": _load_triton})


def gather_rows(x: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor] = None,
                backend: str = "auto") -> torch.Tensor:
    """out[i] = x[index[i]]: the batch reordered, whole samples at a time (differentiable).

    Args:
        x: [B, ...] floating; NCHW- or channels_last-contiguous inputs are read in place and the
            output keeps x's memory format (others are made contiguous first).
        index: [B] int64, a permutation of range(B), on x's device (e.g. a RoutePlan's order[l]).
        mask: optional tensor like x; out[i] is zeroed where mask[index[i]] <= 0 (the backward
            of a ReLU fused into combine_rows, with mask = its output).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see spottune_ext.backends).

    Every backend checks that index is a permutation before moving a row: on the CPU (and Triton
    under TRITON_INTERPRET=1) a bad index raises a ValueError or RuntimeError naming it; on a GPU
    the check is a device-side assertion (no host synchronisation; a failure leaves the CUDA
    context unusable).
    """
    _checks.gather_rows(x, index, mask)
    return backends.implementation("gather_rows", backend, x.device)(x, index, mask)
