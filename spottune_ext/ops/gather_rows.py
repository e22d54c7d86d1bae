"""spottune_ext.gather_rows: reorder the samples of a batch (whole-sample row copies)."""
from typing import Optional

import torch

from .. import _library, backends, reference
from ..triton import gather_rows as triton_gather_rows

_library.define_triton_variant("gather_rows", triton_gather_rows.gather_rows)

_OPS = {
    "cpp": _library.op("gather_rows"),
    "cuda": _library.op("gather_rows"),
    "triton": _library.op("gather_rows_triton"),
}


def _fake(x, index, mask):
    return torch.empty_like(x, memory_format=reference.row_memory_format(x))


def _setup_context(ctx, inputs, output):
    _, index, mask = inputs
    ctx.save_for_backward(index, mask)


def _make_backward(suffix):
    def backward(ctx, grad):
        index, mask = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # index is a permutation, so the gradient of the gather is the scatter grad_x[index[i]] = grad[i]
        # (combine_rows is looked up here: spottune_ext/ops/combine_rows.py defines its variants).
        grad_x = _library.op("combine_rows" + suffix)(grad, grad[:0], index, None, False)
        if mask is not None:
            grad_x = torch.where(mask > 0, grad_x, 0)
        return grad_x, None, None  # the mask only gates: zero gradient almost everywhere
    return backward


_library.register_fake(["gather_rows", "gather_rows_triton"], _fake)
_library.register_autograd(["gather_rows"], _make_backward(""), _setup_context)
_library.register_autograd(["gather_rows_triton"], _make_backward("_triton"), _setup_context)


def _check(x: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gather_rows expects x as a tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("gather_rows expects x with a batch dimension [B, ...], got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"gather_rows expects a floating x, got {x.dtype}")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"gather_rows expects index as an int64 tensor, got {got}")
    if index.shape != x.shape[:1]:
        raise ValueError(f"gather_rows expects index of shape [B] = [{x.shape[0]}] (a permutation of the batch), "
                         f"got {list(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"gather_rows expects index on x's device {x.device}, got {index.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"gather_rows expects mask of x's shape {list(x.shape)}, got {got}")
        if mask.dtype != x.dtype:
            raise TypeError(f"gather_rows expects mask of x's dtype {x.dtype}, got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"gather_rows expects mask on x's device {x.device}, got {mask.device}")


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

    The C++ CPU kernel checks that index is a permutation; the other backends check only its range
    (the CUDA kernel with a device assertion, the Triton kernel not at all).
    """
    _check(x, index, mask)
    impl = backends.resolve("gather_rows", backend, x.device)
    if impl == "torch":
        return reference.gather_rows(x, index, mask)
    return _OPS[impl](x, index, mask)
