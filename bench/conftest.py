import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def synchronize():
    if HAS_CUDA:
        torch.cuda.synchronize()
