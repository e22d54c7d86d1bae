"""Helpers shared by the benchmark files: peak memory of one step, device synchronisation."""
import torch
from torch.profiler import ProfilerActivity, profile


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(step) -> int:
    """Peak of the live tensor memory that `step` allocates through PyTorch's CPU allocator: the
    profiler records every allocation and free (profile_memory=True); their running sum, in time
    order from the step's start, peaks at the returned value (memory live before the step, e.g.
    the weights, is not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(step, device) -> int:
    """Peak of the CUDA caching allocator's allocated memory during `step`, above what was allocated
    before it (torch.cuda.max_memory_allocated)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_bytes(step, device) -> int:
    """Peak memory of one call of `step` on `device` (CUDA allocator on GPU, the profiler on CPU)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(step, device)
    return cpu_peak_bytes(step)
