"""spottune_ext.combine_rows: merge two route groups back into one batch, with the block's
residual add and ReLU fused into the row copies."""
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .. import _checks, _library, backends, reference


def _torch(src0, src1, dest, residual, relu):
    _checks.permutation("combine_rows", "dest", dest)  # a repeat would leave rows of index_copy_'s output unset
    return reference.combine_rows(src0, src1, dest, residual, relu)


def _load_triton():
    from ..triton import combine_rows as kernels
    _library.define_triton_variant("combine_rows", kernels.combine_rows)
    _library.register_fake(["combine_rows_triton"], _fake)
    _library.register_autograd(["combine_rows_triton"], _make_backward("triton"), _setup_context)
    return _library.op("combine_rows_triton")


def _fake(src0, src1, dest, residual, relu):
    n0 = src0.shape[0]
    # The kernels take src0's memory format unless src0 is empty. Under torch.compile n0 can be a
    # data-dependent size: src0's format is taken without a guard (both sources come from the same
    # block on the same input layout, so their formats agree).
    fmt = reference.row_memory_format(src0 if guard_or_true(n0 != 0) else src1)
    return torch.empty((n0 + src1.shape[0], *src0.shape[1:]), dtype=src0.dtype, device=src0.device,
                       memory_format=fmt)


def _setup_context(ctx, inputs, output):
    src0, _, dest, residual, relu = inputs
    ctx.n0 = src0.shape[0]
    ctx.has_residual = residual is not None
    ctx.save_for_backward(dest, output if relu else None)


def _make_backward(backend):
    def backward(ctx, grad):
        dest, out = ctx.saved_tensors
        # Row i of the sources went to out[dest[i]]: its gradient is grad[dest[i]], zeroed where a
        # fused ReLU was inactive.
        rows = backends.kernel("gather_rows", backend)(grad, dest, out)
        return rows[:ctx.n0], rows[ctx.n0:], None, rows if ctx.has_residual else None, None
    return backward


_library.register_fake(["combine_rows"], _fake)
# The compiled op is one op for its CPU and CUDA kernels: its backward calls the compiled gather_rows.
_library.register_autograd(["combine_rows"], _make_backward("cpp"), _setup_context)
backends.register("combine_rows", {"torch": _torch, "cpp": _library.op("combine_rows"),
                                   "cuda": _library.op("combine_rows")}, {"triton": _load_triton})


def combine_rows(src0: torch.Tensor, src1: torch.Tensor, dest: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 relu: bool = False, backend: str = "auto") -> torch.Tensor:
    """out[dest[i]] = act(row i of cat(src0, src1) + residual[i]), in one pass (differentiable).

    Args:
        src0, src1: [n0, ...] and [n1, ...] outputs of the two route groups (either may be empty),
            same dtype, device and sample shape. The output takes src0's memory format (src1's if
            src0 is empty): NCHW or channels_last.
        dest: [n0 + n1] int64, a permutation: where each row goes (a RoutePlan's dest[l]).
        residual: optional [n0 + n1, ...] added to the rows, in source (grouped) order.
        relu: apply a ReLU after the add.
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see spottune_ext.backends).

    Every backend checks that dest is a permutation before writing a row: on the CPU (and Triton
    under TRITON_INTERPRET=1) a bad dest raises a ValueError or RuntimeError naming it; on a GPU
    the check is a device-side assertion (no host synchronisation; a failure leaves the CUDA
    context unusable).
    """
    _checks.combine_rows(src0, src1, dest, residual)
    return backends.implementation("combine_rows", backend, src0.device)(src0, src1, dest, residual, bool(relu))
