"""Global-k losses (paper sec. 3.3, eq. 5-7): push the policy to fine-tune the same k blocks for every image.

All functions take the decisions of a batch, I [B, L] (1 = fine-tuned copy), as returned by the policy
(or model.last_policy). Through the straight-through decisions they are differentiable with respect to
the policy's logits.
"""
import torch


def _check(decisions: torch.Tensor) -> None:
    if not isinstance(decisions, torch.Tensor) or decisions.dim() != 2 or not decisions.is_floating_point():
        got = list(decisions.shape) if isinstance(decisions, torch.Tensor) else type(decisions).__name__
        raise ValueError(f"global-k losses expect floating decisions of shape [B, L], got {got}")
    if decisions.shape[0] == 0:
        raise ValueError("global-k losses need a non-empty batch of decisions")


def usage_fraction(decisions: torch.Tensor) -> torch.Tensor:
    """v [L]: the fraction of the batch routed to each block's fine-tuned copy."""
    _check(decisions)
    return decisions.mean(0)


def global_k_loss(decisions: torch.Tensor, k: float) -> torch.Tensor:
    """l_k = (sum_l v_l - k)^2 (eq. 5)."""
    return (usage_fraction(decisions).sum() - k) ** 2


def entropy_loss(decisions: torch.Tensor) -> torch.Tensor:
    """l_e = -sum_l v_l log v_l (eq. 6), with 0 log 0 = 0.

    At v_l = 0 the derivative of v log v is unbounded; it is taken as 0 there (the block is already
    where l_e wants it), so a block no image uses gets no gradient from l_e instead of a NaN.
    """
    v = usage_fraction(decisions)
    used = v > 0
    return -torch.where(used, v * torch.log(torch.where(used, v, torch.ones_like(v))), torch.zeros_like(v)).sum()


def global_k_objective(task_loss: torch.Tensor, decisions: torch.Tensor, k: float, lambda1: float,
                       lambda2: float) -> torch.Tensor:
    """l = l_c + lambda1 l_k + lambda2 l_e (eq. 7), l_c being the task loss (e.g. cross-entropy)."""
    return task_loss + lambda1 * global_k_loss(decisions, k) + lambda2 * entropy_loss(decisions)
