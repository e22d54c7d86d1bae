import os

import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before triton loads).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def synchronize():
    if HAS_CUDA:
        torch.cuda.synchronize()
