"""Triton kernel of spottune_ext::route_plan_triton: one program per block, a prefix sum, no sort."""
import torch
import triton
import triton.language as tl

from .. import _checks
from ._rows import on_device

MAX_BLOCK = 1024


@triton.jit
def _partition(d_ptr, b, in_batch, L, col, n_frozen, carry):
    """Rows of images b (a tile) in block `col`'s stable partition, and the updated count of chosen."""
    v = tl.load(d_ptr + b * L + col, mask=in_batch, other=0.0)
    chosen = (v != 0).to(tl.int64)
    rank = tl.cumsum(chosen, 0) + carry  # inclusive: fine-tuned images up to and including b
    pos = tl.where(chosen != 0, n_frozen + rank - 1, b - rank)
    return pos, carry + tl.sum(chosen, 0)


@triton.jit
def _route_plan_kernel(d_ptr, order_ptr, dest_ptr, counts_ptr, B, L, CHAIN: tl.constexpr, BLOCK: tl.constexpr):
    l = tl.program_id(0).to(tl.int64)
    # With chain, block l+1's partition says where each image goes next (the last block, whose
    # "next" is itself here, writes batch positions instead).
    nxt = tl.minimum(l + 1, L - 1)
    n_chosen = tl.zeros((), tl.int64)
    n_chosen_next = tl.zeros((), tl.int64)
    n_invalid = tl.zeros((), tl.int64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK).to(tl.int64)
        in_batch = b < B
        v = tl.load(d_ptr + b * L + l, mask=in_batch, other=0.0)
        n_chosen += tl.sum((v != 0).to(tl.int64), 0)
        n_invalid += tl.sum(((v != 0) & (v != 1)).to(tl.int64), 0)
        if CHAIN:
            w = tl.load(d_ptr + b * L + nxt, mask=in_batch, other=0.0)
            n_chosen_next += tl.sum((w != 0).to(tl.int64), 0)
    carry = tl.zeros((), tl.int64)
    carry_next = tl.zeros((), tl.int64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK).to(tl.int64)
        in_batch = b < B
        pos, carry = _partition(d_ptr, b, in_batch, L, l, B - n_chosen, carry)
        target = b
        if CHAIN:
            pos_next, carry_next = _partition(d_ptr, b, in_batch, L, nxt, B - n_chosen_next, carry_next)
            target = tl.where(l + 1 < L, pos_next, b)
        tl.store(order_ptr + l * B + pos, b, mask=in_batch)
        tl.store(dest_ptr + l * B + pos, target, mask=in_batch)
    tl.store(counts_ptr + l, n_chosen)
    tl.atomic_add(counts_ptr + L, n_invalid)  # integer sum: the same in any order


def route_plan(decisions, chain):
    _checks.route_plan(decisions)
    with on_device(decisions):
        return _route_plan(decisions, chain)


def _route_plan(decisions, chain):
    d = decisions.contiguous()
    B, L = d.shape
    order = torch.empty((L, B), dtype=torch.int64, device=d.device)
    dest = torch.empty((L, B), dtype=torch.int64, device=d.device)
    counts = torch.zeros(L + 1, dtype=torch.int64, device=d.device)
    if L:
        block = min(MAX_BLOCK, max(16, triton.next_power_of_2(B)))
        _route_plan_kernel[(L,)](d, order, dest, counts, B, L, CHAIN=chain, BLOCK=block)
    return order, dest, counts
