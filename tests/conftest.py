import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def backend_devices():
    """(backend, device) pairs this machine can run."""
    pairs = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu")]
    if HAS_CUDA:
        pairs += [("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    return pairs


@pytest.fixture(params=backend_devices(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param
