import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before triton loads).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def backend_devices():
    """(backend, device) pairs this machine can run."""
    pairs = [("torch", "cpu"), ("cpp", "cpu")] + ([("triton", "cpu")] if INTERPRET else [])
    if HAS_CUDA:
        pairs += [("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    return pairs


@pytest.fixture(params=backend_devices(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared machine, one thread avoids OpenMP contention that slows them many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
