"""The fused straight-through Gumbel op against torch's gumbel_softmax (hard=True).

On the CPU: the C++ kernel, the plain-torch logistic reference, and the torch composite. On a
GPU: the CUDA and Triton kernels, the composite eager and under torch.compile. (Triton under
TRITON_INTERPRET is a correctness tool, not a speed path, so it is not timed on the CPU.)
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import spottune_ext
from conftest import DEVICE, HAS_CUDA, synchronize

SHAPES = [(64, 16), (256, 16), (4096, 33)]
TAU = 5.0
# Forward+backward at 256 x 16: at least 5x faster than the composite, and on a GPU faster than
# the composite compiled.
TARGETS = {
    ("fused_cpp", (256, 16), "forward_backward"): [{"vs": "torch_gumbel_softmax", "max_ratio": 0.2}],
    ("fused_cuda", (256, 16), "forward_backward"): [{"vs": "torch_gumbel_softmax", "max_ratio": 0.2},
                                                    {"vs": "torch_gumbel_softmax_compiled", "max_ratio": 1.0}],
    ("fused_triton", (256, 16), "forward_backward"): [{"vs": "torch_gumbel_softmax", "max_ratio": 0.2},
                                                      {"vs": "torch_gumbel_softmax_compiled", "max_ratio": 1.0}],
}


def composite(logits):
    return F.gumbel_softmax(logits, tau=TAU, hard=True)[..., 1]


@functools.lru_cache(maxsize=None)
def compiled_composite():
    return torch.compile(composite)


IMPLS = {
    "torch_gumbel_softmax": composite,
    "reference_logistic": functools.partial(spottune_ext.gumbel_st, tau=TAU, backend="torch"),
}
if HAS_CUDA:
    IMPLS["torch_gumbel_softmax_compiled"] = lambda x: compiled_composite()(x)
    IMPLS["fused_cuda"] = functools.partial(spottune_ext.gumbel_st, tau=TAU, backend="cuda")
    IMPLS["fused_triton"] = functools.partial(spottune_ext.gumbel_st, tau=TAU, backend="triton")
else:
    IMPLS["fused_cpp"] = functools.partial(spottune_ext.gumbel_st, tau=TAU, backend="cpp")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
def test_gumbel_st(benchmark, impl, shape, pass_):
    benchmark.group = f"gumbel_st {pass_} {shape[0]}x{shape[1]} {DEVICE}"
    benchmark.extra_info.update(op="gumbel_st", impl=impl, shape=list(shape), device=DEVICE,
                                baseline="torch_gumbel_softmax", targets=TARGETS.get((impl, shape, pass_), []))
    fn = IMPLS[impl]
    logits = torch.randn(*shape, 2, device=DEVICE, requires_grad=pass_ == "forward_backward")
    upstream = torch.randn(*shape, device=DEVICE)

    def step():
        if pass_ == "forward":
            with torch.no_grad():
                out = fn(logits)
        else:
            out = fn(logits)
            out.backward(upstream)
        synchronize()
        return out

    step()  # compile / warm up outside the timing
    out = benchmark(step)
    assert out.shape == shape
