"""Triton kernel of spottune_ext::combine_rows_triton: one program per (sample, chunk), the
residual add and ReLU fused into the copy to the sample's destination row."""
import torch
import triton
import triton.language as tl

from .. import _checks
from ..reference import row_memory_format
from ._rows import BLOCK, grid, on_device, row_size


@triton.jit
def _combine_rows_kernel(src_ptr, dest_ptr, res_ptr, out_ptr, row_size, HAS_RESIDUAL: tl.constexpr,
                         RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < row_size
    v = tl.load(src_ptr + row * row_size + offs, mask=in_row)
    if HAS_RESIDUAL or RELU:
        acc = v.to(ACC)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + row * row_size + offs, mask=in_row).to(ACC)
        if RELU:
            acc = tl.where(acc < 0, tl.zeros_like(acc), acc)  # NaN passes through, as in torch.relu
        v = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tl.load(dest_ptr + row) * row_size + offs, v, mask=in_row)


def combine_rows(src0, src1, dest, residual, relu):
    _checks.combine_rows(src0, src1, dest, residual)
    with on_device(src0):
        _checks.permutation("combine_rows", "dest", dest)
        return _combine_rows(src0, src1, dest, residual, relu)


def _combine_rows(src0, src1, dest, residual, relu):
    n0 = src0.shape[0]
    fmt = row_memory_format(src0 if n0 else src1)
    out = torch.empty((n0 + src1.shape[0], *src0.shape[1:]), dtype=src0.dtype, device=src0.device,
                      memory_format=fmt)
    size = row_size(src0)
    if not size:
        return out
    acc = tl.float64 if src0.dtype == torch.float64 else tl.float32
    dest = dest.contiguous()
    res = residual.contiguous(memory_format=fmt) if residual is not None else None
    # One launch per source; rows [first, first + rows) of the combined batch.
    for src, first in ((src0, 0), (src1, n0)):
        rows = src.shape[0]
        if rows == 0:
            continue
        src = src.contiguous(memory_format=fmt)
        res_rows = res[first:first + rows] if res is not None else src
        _combine_rows_kernel[grid(rows, size)](src, dest[first:first + rows], res_rows, out, size,
                                               HAS_RESIDUAL=res is not None, RELU=relu, ACC=acc, BLOCK=BLOCK)
    return out
