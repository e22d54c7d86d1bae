"""Triton kernels of spottune_ext::gumbel_st_triton and its backward."""
import torch
import triton
import triton.language as tl

from .. import _checks
from ._rows import on_device

BLOCK = 1024
UNIFORM_EPS = 1e-7  # as kUniformEps in csrc/gumbel_st_math.h


@triton.jit
def _gumbel_st_kernel(logits_ptr, noise_ptr, seed_ptr, hard_ptr, soft_ptr, n, inv_tau_ptr,
                      SAMPLE: tl.constexpr, USE_NOISE: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    l0 = tl.load(logits_ptr + 2 * offs, mask=mask, other=0.0).to(ACC)
    l1 = tl.load(logits_ptr + 2 * offs + 1, mask=mask, other=0.0).to(ACC)
    d = l1 - l0
    if SAMPLE:
        if USE_NOISE:
            u = tl.load(noise_ptr + offs, mask=mask, other=0.5)
        else:
            # The Philox stream of csrc/philox.h: word offs % 4 of counter offs // 4.
            c0, c1, c2, c3 = tl.randint4x(tl.load(seed_ptr), offs // 4)
            k = offs % 4
            word = tl.where(k == 0, c0, tl.where(k == 1, c1, tl.where(k == 2, c2, c3)))
            u = tl.random.uint_to_uniform_float(word)
        u = tl.minimum(tl.maximum(u, EPS), 1.0 - EPS).to(ACC)
        d = d + tl.log(u / (1.0 - u))
    x = d * tl.load(inv_tau_ptr)
    e = tl.exp(-tl.abs(x))  # stable sigmoid: exp never overflows
    soft = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    hard = tl.where(d > 0, 1.0, tl.where(d == d, 0.0, d))  # NaN where d is NaN, as the other backends
    tl.store(hard_ptr + offs, hard.to(hard_ptr.dtype.element_ty), mask=mask)
    tl.store(soft_ptr + offs, soft, mask=mask)


@triton.jit
def _gumbel_st_backward_kernel(grad_ptr, soft_ptr, out_ptr, n, inv_tau_ptr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(soft_ptr + offs, mask=mask, other=0.0)
    d1 = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC) * s * (1.0 - s) * tl.load(inv_tau_ptr)
    tl.store(out_ptr + 2 * offs, (-d1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, d1.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _inv_tau(tau, acc, device):
    """1 / tau in the accumulation dtype, read by the kernel (a float argument would be float32)."""
    return torch.full((1,), 1.0 / tau, dtype=acc, device=device)


def forward(logits, noise, seed, tau, sample):
    _checks.gumbel_st(logits, noise, seed, tau, sample)
    with on_device(logits):
        return _forward(logits, noise, seed, tau, sample)


def backward(grad, soft, tau):
    _checks.gumbel_st_backward(grad, soft, tau)
    with on_device(grad):
        return _backward(grad, soft, tau)


def _forward(logits, noise, seed, tau, sample):
    x = logits.contiguous()
    acc, tl_acc = _acc(x.dtype)
    hard = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
    soft = torch.empty(x.shape[:2], dtype=acc, device=x.device)
    n = hard.numel()
    use_noise = sample and noise is not None
    if not sample or use_noise:
        seed = hard  # unused pointer argument
    if n:
        _gumbel_st_kernel[(triton.cdiv(n, BLOCK),)](
            x, noise.contiguous() if use_noise else hard, seed, hard, soft, n, _inv_tau(tau, acc, x.device),
            SAMPLE=sample, USE_NOISE=use_noise, ACC=tl_acc, EPS=UNIFORM_EPS, BLOCK=BLOCK)
    return hard, soft


def _backward(grad, soft, tau):
    g = grad.contiguous()
    acc, tl_acc = _acc(g.dtype)
    out = torch.empty((*g.shape, 2), dtype=g.dtype, device=g.device)
    n = g.numel()
    if n:
        _gumbel_st_backward_kernel[(triton.cdiv(n, BLOCK),)](g, soft.contiguous(), out, n,
                                                              _inv_tau(tau, acc, g.device), ACC=tl_acc, BLOCK=BLOCK)
    return out
