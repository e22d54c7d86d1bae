"""Triton kernel of spottune_ext::gather_rows_triton: one program per (sample, chunk)."""
import torch
import triton
import triton.language as tl

from .. import _checks
from ..reference import row_memory_format
from ._rows import BLOCK, grid, on_device, row_size


@triton.jit
def _gather_rows_kernel(x_ptr, index_ptr, mask_ptr, out_ptr, row_size, HAS_MASK: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < row_size
    src = tl.load(index_ptr + row) * row_size + offs
    v = tl.load(x_ptr + src, mask=in_row)
    if HAS_MASK:
        keep = tl.load(mask_ptr + src, mask=in_row, other=0.0) > 0
        v = tl.where(keep, v, tl.zeros_like(v))
    tl.store(out_ptr + row * row_size + offs, v, mask=in_row)


def gather_rows(x, index, mask):
    _checks.gather_rows(x, index, mask)
    with on_device(x):
        _checks.permutation("gather_rows", "index", index)
        return _gather_rows(x, index, mask)


def _gather_rows(x, index, mask):
    fmt = row_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    out = torch.empty_like(x, memory_format=fmt)
    rows, size = x.shape[0], row_size(x)
    if rows and size:
        m = mask.contiguous(memory_format=fmt) if mask is not None else x
        _gather_rows_kernel[grid(rows, size)](x, index.contiguous(), m, out, size, HAS_MASK=mask is not None,
                                              BLOCK=BLOCK)
    return out
