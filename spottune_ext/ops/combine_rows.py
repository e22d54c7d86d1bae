"""spottune_ext.combine_rows: merge two route groups back into one batch, with the block's
residual add and ReLU fused into the row copies."""
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .. import _library, backends, reference
from ..triton import combine_rows as triton_combine_rows

_library.define_triton_variant("combine_rows", triton_combine_rows.combine_rows)

_OPS = {
    "cpp": _library.op("combine_rows"),
    "cuda": _library.op("combine_rows"),
    "triton": _library.op("combine_rows_triton"),
}


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


def _make_backward(suffix):
    def backward(ctx, grad):
        dest, out = ctx.saved_tensors
        # Row i of the sources went to out[dest[i]]: its gradient is grad[dest[i]], zeroed where a
        # fused ReLU was inactive.
        rows = _library.op("gather_rows" + suffix)(grad, dest, out)
        return rows[:ctx.n0], rows[ctx.n0:], None, rows if ctx.has_residual else None, None
    return backward


_library.register_fake(["combine_rows", "combine_rows_triton"], _fake)
_library.register_autograd(["combine_rows"], _make_backward(""), _setup_context)
_library.register_autograd(["combine_rows_triton"], _make_backward("_triton"), _setup_context)


def _check_like(name: str, t: torch.Tensor, like: torch.Tensor, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"combine_rows expects {name} as a tensor, got {type(t).__name__}")
    if list(t.shape) != list(shape):
        raise ValueError(f"combine_rows expects {name} of shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"combine_rows expects {name} of src0's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"combine_rows expects {name} on src0's device {like.device}, got {t.device}")


def _check(src0, src1, dest, residual) -> None:
    for name, src in (("src0", src0), ("src1", src1)):
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"combine_rows expects {name} as a tensor [n, ...], got {type(src).__name__}")
        if src.dim() < 1:
            raise ValueError(f"combine_rows expects {name} with a batch dimension [n, ...], got a 0-d tensor")
    if not src0.is_floating_point():
        raise TypeError(f"combine_rows expects floating sources, got {src0.dtype}")
    _check_like("src1", src1, src0, [src1.shape[0], *src0.shape[1:]])  # src0's sample shape
    B = src0.shape[0] + src1.shape[0]
    if not isinstance(dest, torch.Tensor) or dest.dtype != torch.int64:
        got = dest.dtype if isinstance(dest, torch.Tensor) else type(dest).__name__
        raise TypeError(f"combine_rows expects dest as an int64 tensor, got {got}")
    if list(dest.shape) != [B]:
        raise ValueError(f"combine_rows expects dest of shape [rows(src0) + rows(src1)] = [{B}] (a permutation), "
                         f"got {list(dest.shape)}")
    if dest.device != src0.device:
        raise ValueError(f"combine_rows expects dest on src0's device {src0.device}, got {dest.device}")
    if residual is not None:
        _check_like("residual", residual, src0, [B, *src0.shape[1:]])


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

    The C++ CPU kernel checks that dest is a permutation; the other backends check only its range
    (the CUDA kernel with a device assertion, the Triton kernel not at all).
    """
    _check(src0, src1, dest, residual)
    impl = backends.resolve("combine_rows", backend, src0.device)
    if impl == "torch":
        return reference.combine_rows(src0, src1, dest, residual, bool(relu))
    return _OPS[impl](src0, src1, dest, residual, bool(relu))
