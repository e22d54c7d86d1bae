"""spottune_ext.gumbel_st: the fused straight-through Gumbel-softmax decision (paper eq. 3-4)."""
import math
from typing import Optional

import torch

from .. import _library, backends, reference
from ..triton import gumbel_st as triton_gumbel_st

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_library.define_triton_variant("gumbel_st", triton_gumbel_st.forward)
_library.define_triton_variant("gumbel_st_backward", triton_gumbel_st.backward)

_OPS = {
    "torch": (reference.gumbel_st, None),
    "cpp": (_library.op("gumbel_st"), _library.op("gumbel_st_backward")),
    "cuda": (_library.op("gumbel_st"), _library.op("gumbel_st_backward")),
    "triton": (_library.op("gumbel_st_triton"), _library.op("gumbel_st_backward_triton")),
}


def _fake(logits, noise, seed, tau, sample):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shape = logits.shape[:2]
    return logits.new_empty(shape), logits.new_empty(shape, dtype=acc)


def _fake_backward(grad, soft, tau):
    return grad.new_empty((*grad.shape, 2))


def _setup_context(ctx, inputs, output):
    ctx.tau = inputs[3]
    ctx.save_for_backward(output[1])


def _make_backward(backward_op):
    def backward(ctx, grad_hard, grad_soft):
        # Both outputs carry the relaxation's gradient: hard by straight-through, soft as itself.
        (soft,) = ctx.saved_tensors
        grad = grad_hard if grad_soft is None else grad_hard + grad_soft.to(grad_hard.dtype)
        return backward_op(grad, soft, ctx.tau), None, None, None, None
    return backward


_library.register_fake(["gumbel_st", "gumbel_st_triton"], _fake)
_library.register_fake(["gumbel_st_backward", "gumbel_st_backward_triton"], _fake_backward)
# The compiled op's autograd is registered in C++ (csrc/gumbel_st_autograd.cpp).
_library.register_autograd(["gumbel_st_triton"], _make_backward(_OPS["triton"][1]), _setup_context)


def _check(logits: torch.Tensor, tau: float, noise: Optional[torch.Tensor]) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"gumbel_st expects logits as a tensor of shape [B, L, 2], got {type(logits).__name__}")
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"gumbel_st expects logits of shape [B, L, 2], got {list(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gumbel_st expects floating logits (float32, float16, bfloat16 or float64), got {logits.dtype}")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"gumbel_st expects a finite temperature tau > 0, got {tau!r}")
    if noise is not None:
        if noise.shape != logits.shape[:2]:
            raise ValueError(f"gumbel_st expects noise of shape [B, L] = {list(logits.shape[:2])}, got {list(noise.shape)}")
        if noise.dtype != torch.float32 or noise.device != logits.device:
            raise TypeError(f"gumbel_st expects float32 noise on {logits.device}, got {noise.dtype} on {noise.device}")


def gumbel_st(logits: torch.Tensor, tau: float = 1.0, *, sample: bool = True, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Per-image, per-block route decisions with the straight-through Gumbel-softmax.

    Args:
        logits: [B, L, 2] scores of the frozen (index 0) and fine-tuned (index 1) copy of each block.
        tau: softmax temperature of the relaxation, > 0.
        sample: add Gumbel noise (training); False takes the argmax (deterministic evaluation).
        noise: optional uniform samples [B, L] (float32, in (0, 1)) used instead of drawing noise,
            for exact comparisons; the logistic noise is log(u / (1 - u)).
        generator: the generator the noise seed is drawn from (default: the global one on logits'
            device, so torch.manual_seed makes runs reproducible).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see spottune_ext.backends).

    Returns:
        I [B, L] in logits' dtype, exactly 0.0 or 1.0 (1 = fine-tuned copy). Its gradient is that of
        sigmoid((l1 - l0 + g) / tau), the two-route softmax relaxation (straight-through).
    """
    _check(logits, tau, noise)
    backend = backends.resolve("gumbel_st", backend, logits.device)
    seed = None
    if sample and noise is None:
        if backend == "torch":  # plain torch draws its uniforms directly
            noise = torch.rand(logits.shape[:2], device=logits.device, generator=generator)
        else:  # the kernels key their own Philox stream with a seed from torch's generator
            seed = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, device=logits.device, generator=generator)
    return _OPS[backend][0](logits, noise, seed, float(tau), sample)[0]


def gumbel_st_impl(backend: str):
    """The raw op of a concrete backend: (logits, noise, seed, tau, sample) -> (hard, soft)."""
    return _OPS[backend][0]
