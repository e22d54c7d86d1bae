"""Argument checks of every op, raised before any kernel touches memory.

The Python layer (spottune_ext/ops/) runs them for every backend, the Triton registrations
(spottune_ext/triton/) for direct calls of torch.ops.spottune_ext.*_triton, and the "torch" backend
for the permutation its index_copy_ would not check. The C++ and CUDA kernels check the same in
C++ (csrc/row_ops.h, csrc/gumbel_st_checks.h). Bad types raise TypeError, bad values ValueError,
each naming the op, the argument and what was expected.
"""
import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT_NAMES = "float32, float64, float16 or bfloat16"
FLT_MAX = torch.finfo(torch.float32).max
# The kernels multiply by 1 / tau in float32: below this, 1 / tau overflows to inf.
TAU_MIN = 1.0 / FLT_MAX


def tensor(op: str, name: str, value, expected: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op} expects {name} as a tensor {expected}, got {type(value).__name__}")


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op} expects a floating {name} ({_FLOAT_NAMES}), got {t.dtype}")


def same_device(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{op} expects {name} on {like_name}'s device {like.device}, got {t.device}")


def tau(op: str, value, name: str = "tau") -> float:
    """A temperature whose inverse is finite in float32; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op} expects {name} as a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < TAU_MIN:
        raise ValueError(f"{op} expects a finite {name} >= {TAU_MIN:.6g} (1 / the largest float32, so that "
                         f"1 / {name} is finite in float32), got {value!r}")
    return value


def gumbel_st(logits, noise, seed, tau_value, sample) -> None:
    """The arguments of spottune_ext::gumbel_st(logits, noise, seed, tau, sample)."""
    op = "gumbel_st"
    tensor(op, "logits", logits, "of shape [B, L, 2]")
    floating(op, "logits", logits)
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"{op} expects logits of shape [B, L, 2], got {list(logits.shape)}")
    tau(op, tau_value)
    if noise is not None:
        tensor(op, "noise", noise, "of shape [B, L] (float32 uniform samples)")
        same_device(op, "noise", noise, "logits", logits)
        if noise.dtype != torch.float32:
            raise TypeError(f"{op} expects float32 noise, got {noise.dtype}")
        if noise.shape != logits.shape[:2]:
            raise ValueError(f"{op} expects noise of shape [B, L] = {list(logits.shape[:2])}, got {list(noise.shape)}")
    if seed is not None:
        tensor(op, "seed", seed, "(one int64 value)")
        same_device(op, "seed", seed, "logits", logits)
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"{op} expects seed as one int64 value, got {seed.dtype} of shape {list(seed.shape)}")
    if sample and noise is None and seed is None:
        raise ValueError(f"{op}: sampling needs noise or a seed")


def gumbel_st_backward(grad, soft, tau_value) -> None:
    """The arguments of spottune_ext::gumbel_st_backward(grad, soft, tau)."""
    op = "gumbel_st_backward"
    tensor(op, "grad", grad, "of shape [B, L]")
    floating(op, "grad", grad)
    if grad.dim() != 2:
        raise ValueError(f"{op} expects grad of shape [B, L], got {list(grad.shape)}")
    tensor(op, "soft", soft, "of shape [B, L]")
    same_device(op, "soft", soft, "grad", grad)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if soft.dtype != acc:
        raise TypeError(f"{op} expects soft of dtype {acc} for {grad.dtype} grad, got {soft.dtype}")
    if soft.shape != grad.shape:
        raise ValueError(f"{op} expects soft of grad's shape {list(grad.shape)}, got {list(soft.shape)}")
    tau(op, tau_value)


def route_plan(decisions) -> None:
    op = "route_plan"
    tensor(op, "decisions", decisions, "of shape [B, L]")
    if decisions.dim() != 2:
        raise ValueError(f"{op} expects decisions of shape [B, L], got {list(decisions.shape)}")
    if decisions.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op} expects floating decisions (0.0 or 1.0, as gumbel_st returns) of dtype "
                        f"{_FLOAT_NAMES}, got {decisions.dtype}")


def _index(op: str, name: str, index, like_name: str, like: torch.Tensor, n, label: str) -> None:
    """index: int64 of shape [n], n described by `label` (e.g. "B"). Shapes are formatted only for an
    error: formatting a traced size would specialise a compiled graph to it."""
    tensor(op, name, index, f"of shape [{label}] (a permutation)")
    if index.dtype != torch.int64:
        raise TypeError(f"{op} expects {name} as an int64 tensor, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != n:
        raise ValueError(f"{op} expects {name} of shape [{label}] = [{n}] (a permutation of range({n})), "
                         f"got {list(index.shape)}")
    same_device(op, name, index, like_name, like)


def _like(op: str, name: str, t, like_name: str, like: torch.Tensor, shape, what: str = "") -> None:
    """t: like's dtype and device, the given shape (`what` describes it, e.g. "x's shape")."""
    what = what or "shape"
    tensor(op, name, t, f"of {what} {list(shape)}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{op} expects {name} of {what} {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{op} expects {name} of {like_name}'s dtype {like.dtype}, got {t.dtype}")
    same_device(op, name, t, like_name, like)


def gather_rows(x, index, mask) -> None:
    """The arguments of spottune_ext::gather_rows(x, index, mask), index's values excepted (permutation())."""
    op = "gather_rows"
    tensor(op, "x", x, "of shape [B, ...]")
    if x.dim() < 1:
        raise ValueError(f"{op} expects x with a batch dimension [B, ...], got a 0-d tensor")
    floating(op, "x", x)
    _index(op, "index", index, "x", x, x.shape[0], "B")
    if mask is not None:
        _like(op, "mask", mask, "x", x, x.shape, "x's shape")


def combine_rows(src0, src1, dest, residual) -> None:
    """The arguments of spottune_ext::combine_rows(src0, src1, dest, residual, relu), dest's values
    excepted (permutation())."""
    op = "combine_rows"
    for name, src in (("src0", src0), ("src1", src1)):
        tensor(op, name, src, "of shape [n, ...]")
        if src.dim() < 1:
            raise ValueError(f"{op} expects {name} with a batch dimension [n, ...], got a 0-d tensor")
    floating(op, "src0", src0)
    _like(op, "src1", src1, "src0", src0, [src1.shape[0], *src0.shape[1:]])  # src0's sample shape
    rows = src0.shape[0] + src1.shape[0]
    _index(op, "dest", dest, "src0", src0, rows, "rows(src0) + rows(src1)")
    if residual is not None:
        _like(op, "residual", residual, "src0", src0, [rows, *src0.shape[1:]])


def permutation(op: str, name: str, index: torch.Tensor) -> None:
    """Checks that the int64 [n] `index` holds every value of range(n) once.

    On the CPU it raises a ValueError naming the first bad entry. On a GPU it is a device-side
    assertion (torch._assert_async: no host synchronisation, but a failure leaves the CUDA context
    unusable, as any device assert does).
    """
    n = index.numel()
    if n == 0:
        return
    in_range = (index >= 0) & (index < n)
    counts = torch.zeros(n, dtype=torch.int32, device=index.device).index_add_(
        0, index.clamp(0, n - 1), in_range.to(torch.int32))
    if index.device.type != "cpu":
        what = f"{op}: {name} must be a permutation of range({n})"
        torch._assert_async(in_range.all(), f"{what}: a value is out of range")
        torch._assert_async((counts == 1).all(), f"{what}: a value repeats")
        return
    bad = (~in_range).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{op}: {name} must be a permutation of range({n}), but {name}[{i}] = {int(index[i])} "
                         f"is out of range")
    repeated = (counts > 1).nonzero()
    if repeated.numel():
        raise ValueError(f"{op}: {name} must be a permutation of range({n}), but {int(repeated[0])} appears "
                         f"{int(counts[repeated[0]])} times")
