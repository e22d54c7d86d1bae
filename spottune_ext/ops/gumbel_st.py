"""spottune_ext.gumbel_st: the fused straight-through Gumbel-softmax decision (paper eq. 3-4)."""
from typing import Optional

import torch

from .. import _checks, _library, backends, reference


def _torch(logits, noise, seed, tau, sample):
    _checks.gumbel_st(logits, noise, seed, tau, sample)
    return reference.gumbel_st(logits, noise, seed, tau, sample)


def _load_triton():
    from ..triton import gumbel_st as kernels
    _library.define_triton_variant("gumbel_st", kernels.forward)
    _library.define_triton_variant("gumbel_st_backward", kernels.backward)
    _library.register_fake(["gumbel_st_triton"], _fake)
    _library.register_fake(["gumbel_st_backward_triton"], _fake_backward)
    _library.register_autograd(["gumbel_st_triton"], _make_backward(_library.op("gumbel_st_backward_triton")),
                               _setup_context)
    return _library.op("gumbel_st_triton")


def _load_triton_backward():
    backends.kernel("gumbel_st", "triton")  # defines both Triton variants
    return _library.op("gumbel_st_backward_triton")


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


_library.register_fake(["gumbel_st"], _fake)
_library.register_fake(["gumbel_st_backward"], _fake_backward)
# The compiled op's autograd is registered in C++ (csrc/gumbel_st_autograd.cpp).
backends.register("gumbel_st", {"torch": _torch, "cpp": _library.op("gumbel_st"), "cuda": _library.op("gumbel_st")},
                  {"triton": _load_triton})
# The backward op on its own (its "torch" version is autograd through the reference).
backends.register("gumbel_st_backward", {"cpp": _library.op("gumbel_st_backward"),
                                         "cuda": _library.op("gumbel_st_backward")},
                  {"triton": _load_triton_backward})


def gumbel_st(logits: torch.Tensor, tau: float = 1.0, *, sample: bool = True, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Per-image, per-block route decisions with the straight-through Gumbel-softmax.

    Args:
        logits: [B, L, 2] scores of the frozen (index 0) and fine-tuned (index 1) copy of each block.
        tau: softmax temperature of the relaxation, a number >= 1 / (the largest float32) ~ 2.9e-39,
            so that 1 / tau is finite in float32 (the kernels multiply by it).
        sample: add Gumbel noise (training); False takes the argmax (deterministic evaluation).
        noise: optional uniform samples [B, L] (float32, in (0, 1)) used instead of drawing noise,
            for exact comparisons; the logistic noise is log(u / (1 - u)).
        generator: the generator the noise seed is drawn from (default: the global one on logits'
            device, so torch.manual_seed makes runs reproducible). Every backend, "torch" included,
            draws its uniforms from the Philox stream keyed by that one seed (csrc/philox.h), so a seed
            gives the same decisions on every backend.
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see spottune_ext.backends).

    Returns:
        I [B, L] in logits' dtype, exactly 0.0 or 1.0 (1 = fine-tuned copy). Its gradient is that of
        sigmoid((l1 - l0 + g) / tau), the two-route softmax relaxation (straight-through).
        Where l1 - l0 is NaN (a NaN logit, or two infinite logits of one sign) the decision is NaN on
        every backend, with a NaN gradient; route_plan and the routed blocks reject it.
    """
    _checks.gumbel_st(logits, noise, None, tau, False)
    tau = _checks.tau("gumbel_st", tau)
    if not isinstance(sample, bool):
        raise TypeError(f"gumbel_st expects sample as a bool, got {type(sample).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"gumbel_st expects generator as a torch.Generator or None, got {type(generator).__name__}")
    impl = backends.implementation("gumbel_st", backend, logits.device)
    seed = None
    if sample and noise is None:  # every backend keys the Philox stream with a seed from torch's generator
        seed = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, device=logits.device, generator=generator)
    return impl(logits, noise, seed, tau, sample)[0]


def gumbel_st_impl(backend: str):
    """The raw op of a concrete backend: (logits, noise, seed, tau, sample) -> (hard, soft)."""
    return backends.kernel("gumbel_st", backend)
