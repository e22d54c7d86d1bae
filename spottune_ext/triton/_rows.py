"""Launch helpers shared by the Triton kernels."""
import contextlib
import math

import torch
import triton

BLOCK = 1024
MAX_CHUNKS = 65535  # the limit of a launch grid's second axis


def row_size(x: torch.Tensor) -> int:
    """Elements per sample."""
    return math.prod(x.shape[1:])


def grid(rows: int, size: int):
    """Programs (samples, chunks of BLOCK elements)."""
    chunks = triton.cdiv(size, BLOCK)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"samples of {size} elements are too large for the Triton row kernels "
                         f"(at most {MAX_CHUNKS * BLOCK})")
    return rows, chunks


def on_device(x: torch.Tensor):
    """Runs the launches inside on x's GPU (and its current stream), whichever GPU is current."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
