import pytest
import torch

from spottune_ext import _ext, backends


def test_auto_picks_the_measured_table():
    for op, table in backends.AUTO.items():
        assert backends.resolve(op, "auto", torch.device("cpu")) == table["cpu"]
    assert backends.resolve("not_in_table", "auto", torch.device("cpu")) == "torch"


def test_auto_on_cuda_without_cuda_kernels_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_ext, "WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1"):
        backends.resolve("gumbel_st", "auto", torch.device("cuda"))


def test_default_backend_overrides_auto(monkeypatch):
    monkeypatch.setattr(backends, "default_backend", "torch")
    assert backends.resolve("gumbel_st", "auto", torch.device("cpu")) == "torch"
    assert backends.resolve("gumbel_st", "cpp", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend,device,match", [
    ("numpy", "cpu", "unknown backend"),
    ("cpp", "cuda", "CPU tensors"),
    ("cuda", "cpu", "CUDA tensors"),
])
def test_bad_choices_raise(backend, device, match):
    with pytest.raises(ValueError, match=match):
        backends.resolve("gumbel_st", backend, torch.device(device))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backends.resolve("gumbel_st", "triton", torch.device("cpu"))
