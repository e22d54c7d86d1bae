"""Speed of route_plan, gather_rows and combine_rows: each kernel against the plain-torch way
(the "torch" backend = spottune_ext.reference: argsort, index_select, cat + add + relu + index_copy).

Shapes are those of ResNet-50 at batch 16 on 112x112 images: a stage-2 output [16, 256, 28, 28]
and a stage-4 output [16, 1024, 7, 7], half of the batch on each route. Compare medians within a
group (pytest-benchmark groups by op, shape and layout).
"""
import pytest
import torch

import spottune_ext as se

CUDA = torch.cuda.is_available()

IMPLS = [pytest.param("torch", "cpu", id="torch-cpu"), pytest.param("cpp", "cpu", id="cpp-cpu")]
if CUDA:
    IMPLS += [pytest.param("torch", "cuda", id="torch-cuda"), pytest.param("cuda", "cuda", id="cuda-cuda"),
              pytest.param("triton", "cuda", id="triton-cuda")]
SHAPES = [pytest.param((16, 256, 28, 28), id="16x256x28x28"), pytest.param((16, 1024, 7, 7), id="16x1024x7x7")]
LAYOUTS = ["nchw", "channels_last"]


def _timed(benchmark, backend, device, fn):
    # The report compares each backend with plain torch on the same device.
    benchmark.extra_info.update(impl=f"{backend}-{device}", baseline=f"torch-{device}")

    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    fn()  # compile / warm caches outside the timing
    return benchmark(run)


def _tensor(shape, device, layout, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _perm(n, device):
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("B,L", [(16, 16), (256, 16)])
@pytest.mark.parametrize("backend,device", IMPLS)
def test_route_plan(benchmark, backend, device, B, L):
    benchmark.group = f"route_plan [{B}, {L}] chain"
    d = (torch.rand(B, L, generator=torch.Generator().manual_seed(0)) < 0.5).float().to(device)
    _timed(benchmark, backend, device, lambda: se.route_plan(d, chain=True, backend=backend))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend,device", IMPLS)
def test_gather_rows(benchmark, backend, device, shape, layout, masked):
    benchmark.group = f"gather_rows{' masked' if masked else ''} {list(shape)} {layout}"
    x = _tensor(shape, device, layout, 1)
    mask = _tensor(shape, device, layout, 2) if masked else None
    index = _perm(shape[0], device)
    _timed(benchmark, backend, device, lambda: se.gather_rows(x, index, mask, backend=backend))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual_relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend,device", IMPLS)
def test_combine_rows(benchmark, backend, device, shape, layout, fused):
    benchmark.group = f"combine_rows{' residual+relu' if fused else ''} {list(shape)} {layout}"
    src = _tensor(shape, device, layout, 1)
    src0, src1 = src[: shape[0] // 2], src[shape[0] // 2:]
    residual = _tensor(shape, device, layout, 2) if fused else None
    dest = _perm(shape[0], device)
    _timed(benchmark, backend, device, lambda: se.combine_rows(src0, src1, dest, residual, fused, backend=backend))
