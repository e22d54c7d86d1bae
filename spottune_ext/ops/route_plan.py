"""spottune_ext.route_plan: how to group a batch by route, for every routed block at once."""
from typing import List, NamedTuple

import torch

from .. import _checks, _library, backends, reference


def _load_triton():
    from ..triton import route_plan as kernels
    _library.define_triton_variant("route_plan", kernels.route_plan)
    _library.register_fake(["route_plan_triton"], _fake)
    return _library.op("route_plan_triton")


class RoutePlan(NamedTuple):
    """The grouping of a batch of B images through L routed blocks.

    order: [L, B] int64; order[l] lists block l's frozen-route images, then its fine-tuned-route
        images, each in batch order (gather rows with it; counts[l] rows at the end are fine-tuned).
    dest: [L, B] int64; where row i of block l's output goes: its batch position, or with
        chain=True its row in block l+1's order (the last block going to batch positions).
    counts: L host ints, images routed to the fine-tuned copy of each block.
    """
    order: torch.Tensor
    dest: torch.Tensor
    counts: List[int]


def _fake(decisions, chain):
    B, L = decisions.shape
    return (decisions.new_empty((L, B), dtype=torch.int64), decisions.new_empty((L, B), dtype=torch.int64),
            decisions.new_empty((L + 1,), dtype=torch.int64))


_library.register_fake(["route_plan"], _fake)
backends.register("route_plan", {"torch": reference.route_plan, "cpp": _library.op("route_plan"),
                                 "cuda": _library.op("route_plan")}, {"triton": _load_triton})


def route_plan(decisions: torch.Tensor, chain: bool = False, backend: str = "auto") -> RoutePlan:
    """Plans the grouping by route of every block: a stable partition per block, one launch.

    Args:
        decisions: [B, L] route of each image at each block, exactly 0.0 (frozen copy) or 1.0
            (fine-tuned copy), e.g. from spottune_ext.gumbel_st. Not differentiated.
        chain: make dest[l] point into block l+1's order, so that block l's combine writes its
            output already grouped for block l+1 (no separate gather between blocks).
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see spottune_ext.backends).

    Returns:
        RoutePlan(order, dest, counts); counts reach the host in one device-to-host copy.

    Raises:
        ValueError if a decision is neither 0 nor 1 (NaN included: gumbel_st returns NaN for a NaN
        logit difference).
    """
    _checks.route_plan(decisions)
    plan = backends.implementation("route_plan", backend, decisions.device)
    order, dest, counts = plan(decisions.detach(), bool(chain))
    if torch.compiler.is_compiling():
        # Traced, the counts are data-dependent sizes: one graph serves every route split.
        counts = [t.shape[0] for t in _route_sizes(counts)]
        for count in counts:
            torch._check(count <= decisions.shape[0])
        return RoutePlan(order, dest, counts)
    counts = counts.tolist()  # the one device-to-host copy of the plan
    _check_counts(counts)
    return RoutePlan(order, dest, counts[:-1])


def _check_counts(counts: List[int]) -> None:
    if counts[-1]:
        raise ValueError(f"route_plan: decisions must be exactly 0 or 1, got {counts[-1]} other value(s) (NaN "
                         f"decisions come from NaN policy logits)")


@torch.library.custom_op("spottune_ext::route_sizes", mutates_args=())
def _route_sizes(counts: torch.Tensor) -> List[torch.Tensor]:
    """A plan's counts [L + 1] as the lengths of L empty tensors (and the check of the last one).

    torch.compile runs it in place of the host copy: its fake gives each length as a new
    data-dependent size, so that a compiled graph carries the sub-batch sizes as symbols (no graph
    break, no recompilation when the split changes, no capture_scalar_outputs needed)."""
    values = counts.tolist()  # the one device-to-host copy of the plan
    _check_counts(values)
    return [counts.new_empty((n,), dtype=torch.uint8) for n in values[:-1]]


@_route_sizes.register_fake
def _route_sizes_fake(counts):
    ctx = torch.library.get_ctx()
    return [counts.new_empty((ctx.new_dynamic_size(),), dtype=torch.uint8) for _ in range(counts.shape[0] - 1)]
