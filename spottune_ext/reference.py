"""Pure-torch reference implementations of every spottune_ext op.

They define the ops' semantics: the tests compare each kernel against them, the benchmarks use
them as the plain-torch baseline, and the "torch" backend runs them. Each takes the same
arguments and returns the same outputs as the op schema in csrc/spottune_ext.cpp.
"""
from typing import Optional, Tuple, Union

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

UNIFORM_EPS = 1e-7  # as kUniformEps in csrc/gumbel_st_math.h

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox_uniform(seed: Union[int, torch.Tensor], n: int, device=None) -> torch.Tensor:
    """The uniform stream of csrc/philox.h, float32 [n]: value i is word i % 4 of Philox4x32-10
    at counter (i // 4, 0, 0, 0), as Triton's tl.randint4x(seed, i // 4).

    seed: an int, or an int64 tensor of one value (read on its device: no host synchronisation).
    uint32 arithmetic in int64 tensors: products wrap modulo 2**64, which keeps both 32-bit halves exact.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64).reshape(())  # >> 32 then & _MASK32: the high word
    else:
        seed &= (1 << 64) - 1
    c0 = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        p0 = c2 * _PHILOX_ROUND_B
        p2 = c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            ((p0 >> 32) & _MASK32) ^ c1 ^ k0,
            p0 & _MASK32,
            ((p2 >> 32) & _MASK32) ^ c3 ^ k1,
            p2 & _MASK32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    words = torch.stack([c0, c1, c2, c3], dim=1).flatten()[:n]
    x = torch.where(words >= 2**31, words - 2**32, words)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def gumbel_st(logits: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], tau: float,
              sample: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Straight-through two-route Gumbel decision: (hard [B, L] in logits' dtype, soft [B, L]).

    hard is exactly 0/1 and carries the gradient of soft = sigmoid((l1 - l0 + g) / tau), with g the
    logistic noise log(u / (1 - u)) (the difference of two Gumbel samples), or 0 when not sampling.
    hard is NaN where l1 - l0 + g is NaN. The uniforms come from the Philox stream of csrc/philox.h
    keyed by `seed`, as in the kernels.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    d = logits[..., 1].to(acc) - logits[..., 0].to(acc)  # upcast first, as the kernels do
    if sample:
        if noise is None:
            noise = philox_uniform(seed, d.numel(), d.device).view_as(d)
        u = noise.to(torch.float32).clamp(UNIFORM_EPS, 1 - UNIFORM_EPS).to(acc)
        d = d + torch.log(u / (1 - u))
    soft = torch.sigmoid(d / tau)
    hard = torch.where(torch.isnan(d), d, (d > 0).to(acc))
    # hard + (soft - soft) is exactly hard; (hard + soft) - soft is not always.
    return (hard + (soft - soft.detach())).to(logits.dtype), soft


def route_plan(decisions: torch.Tensor, chain: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable partition of the batch per block: (order [L, B], dest [L, B], counts [L + 1])."""
    d = decisions.t()
    order = torch.argsort((d != 0).to(torch.int8), dim=1, stable=True)
    counts = torch.cat([(d != 0).sum(1), ((d != 0) & (d != 1)).sum().view(1)])
    if not chain or d.shape[0] < 2:
        return order, order.clone(), counts
    position = torch.argsort(order, dim=1)  # position[l, b] = row of image b in block l's order
    dest = torch.cat([torch.gather(position[1:], 1, order[:-1]), order[-1:]])
    return order, dest, counts


def gather_rows(x: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """out[i] = x[index[i]], zeroed where mask[index[i]] <= 0 when a mask is given; memory format kept."""
    out = x.index_select(0, index)
    if mask is not None:
        # A select, not a product: as torch.relu's backward, a masked-out entry is 0 even if x is inf/NaN.
        out = torch.where(mask.index_select(0, index) > 0, out, 0)
    return out.contiguous(memory_format=row_memory_format(x))


def combine_rows(src0: torch.Tensor, src1: torch.Tensor, dest: torch.Tensor, residual: Optional[torch.Tensor],
                 relu: bool) -> torch.Tensor:
    """out[dest[i]] = act(row i of cat(src0, src1) + residual[i]), act = ReLU or identity."""
    rows = torch.cat([src0, src1])
    if residual is not None:
        rows = rows + residual
    if relu:
        rows = torch.relu(rows)
    # (guard_or_true: under torch.compile src0's size can be data-dependent; see ops/combine_rows.py's fake)
    first = src0 if guard_or_true(src0.shape[0] != 0) else src1
    out = torch.empty_like(rows, memory_format=row_memory_format(first))
    return out.index_copy_(0, dest, rows)  # in place: the out-of-place index_copy drops channels_last


def row_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the row ops write: channels_last for a 4-D channels_last-contiguous tensor (that is
    not also NCHW-contiguous), else contiguous. In both, one sample is one contiguous chunk."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
