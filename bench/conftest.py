"""Shared benchmark settings; collects the benchmark files (bench_*.py) when pytest is pointed at bench/."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before triton loads).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def synchronize():
    if HAS_CUDA:
        torch.cuda.synchronize()


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
