import math

import pytest
import torch

import spottune_ext
from spottune_ext import reference
from conftest import backend_devices

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNELS = [pair for pair in backend_devices() if pair[0] != "torch"]
KERNEL_IDS = [f"{b}-{d}" for b, d in KERNELS]


def _inputs(b, l, dtype=torch.float32, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, l, 2, generator=g) * scale).to(dtype).to(device)
    noise = torch.rand(b, l, generator=g).to(device)
    return logits, noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (64, 16), (37, 33), (5, 1)])
def test_hard_matches_reference_with_injected_noise(backend_device, dtype, shape):
    backend, device = backend_device
    logits, noise = _inputs(*shape, dtype=dtype, device=device)
    for sample in (True, False):
        got = spottune_ext.gumbel_st(logits, 5.0, sample=sample, noise=noise, backend=backend)
        want = reference.gumbel_st(logits, noise, None, 5.0, sample)[0]
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, want)
        assert set(got.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
def test_gradient_matches_reference(backend_device, tau):
    backend, device = backend_device
    logits, noise = _inputs(128, 16, device=device, seed=1)
    upstream = torch.randn(128, 16, device=device)
    x = logits.clone().requires_grad_()
    (spottune_ext.gumbel_st(x, tau, noise=noise, backend=backend) * upstream).sum().backward()
    # Ground truth: the reference in float64 on the same float32 inputs. Element-wise, sigmoid
    # implementations differ by an ulp, so the bound is relative over the whole gradient.
    r = logits.double().requires_grad_()
    (reference.gumbel_st(r, noise, None, tau, True)[0] * upstream.double()).sum().backward()
    err = (x.grad.double() - r.grad).norm() / r.grad.norm()
    assert err < 1e-6, err
    torch.testing.assert_close(x.grad.double(), r.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad[..., 0], -x.grad[..., 1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_gradient_close_to_float32(backend_device, dtype):
    backend, device = backend_device
    logits, noise = _inputs(64, 16, dtype=dtype, device=device, seed=2)
    x = logits.clone().requires_grad_()
    spottune_ext.gumbel_st(x, 2.0, noise=noise, backend=backend).sum().backward()
    r = logits.float().requires_grad_()
    reference.gumbel_st(r, noise, None, 2.0, True)[0].sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), r.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("sample", [True, False])
def test_gradcheck_float64(backend, device, sample):
    logits, noise = _inputs(6, 5, dtype=torch.float64, device=device, seed=3)
    logits.requires_grad_()
    op = spottune_ext.ops.gumbel_st_impl(backend)

    def relaxed(x):
        return op(x, noise, None, 1.5, sample)[1]

    assert torch.autograd.gradcheck(relaxed, (logits,), eps=1e-6, atol=1e-8)

    # The hard output carries exactly the gradient of the relaxed one (straight-through).
    upstream = torch.randn(6, 5, dtype=torch.float64, device=device)
    g_hard, = torch.autograd.grad((op(logits, noise, None, 1.5, sample)[0] * upstream).sum(), logits)
    g_soft, = torch.autograd.grad((relaxed(logits) * upstream).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck(backend, device, dtype):
    op = spottune_ext.ops.gumbel_st_impl(backend)
    logits, noise = _inputs(8, 4, dtype=dtype, device=device, seed=4)
    seed = torch.tensor(1234, device=device)
    for args in [(logits, noise, None, 2.0, True), (logits, None, seed, 2.0, True), (logits, None, None, 2.0, False)]:
        torch.library.opcheck(op, (args[0].clone().requires_grad_(), *args[1:]))


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_seeded_stream_is_the_same_on_every_backend(backend, device):
    # The kernels' Philox stream is the reference's, bit for bit, so the decisions agree exactly.
    logits, _ = _inputs(64, 33, device=device, seed=5)
    seed = torch.tensor(-987654321987, device=device)
    got = spottune_ext.ops.gumbel_st_impl(backend)(logits, None, seed, 1.0, True)
    want = reference.gumbel_st(logits, None, seed, 1.0, True)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1].detach(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_decisions(backend_device):
    backend, device = backend_device
    logits, _ = _inputs(256, 16, device=device, seed=6, scale=0.5)
    torch.manual_seed(42)
    a = spottune_ext.gumbel_st(logits, 5.0, backend=backend)
    b = spottune_ext.gumbel_st(logits, 5.0, backend=backend)
    torch.manual_seed(42)
    c = spottune_ext.gumbel_st(logits, 5.0, backend=backend)
    gen = torch.Generator(device=device).manual_seed(42)
    d = spottune_ext.gumbel_st(logits, 5.0, backend=backend, generator=gen)
    gen.manual_seed(42)
    e = spottune_ext.gumbel_st(logits, 5.0, backend=backend, generator=gen)
    assert torch.equal(a, c) and torch.equal(d, e)
    assert not torch.equal(a, b)


def test_sampling_frequency_matches_softmax(backend_device):
    # P(I = 1) = softmax(logits)[1] = sigmoid(l1 - l0), whatever the temperature.
    backend, device = backend_device
    gaps = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], device=device)
    n = 100_000
    logits = torch.zeros(n, len(gaps), 2, device=device)
    logits[..., 1] = gaps
    torch.manual_seed(7)
    freq = spottune_ext.gumbel_st(logits, 5.0, backend=backend).mean(0)
    p = torch.sigmoid(gaps)
    bound = 5 * torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() < bound), (freq, p)


def test_argmax_mode_is_deterministic_and_ties_go_frozen(backend_device):
    backend, device = backend_device
    logits = torch.tensor([[[1.0, 2.0], [2.0, 1.0], [0.5, 0.5]]], device=device)
    out = spottune_ext.gumbel_st(logits, 1.0, sample=False, backend=backend)
    assert out.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_stay_finite(backend_device, dtype):
    backend, device = backend_device
    logits = torch.tensor([[[1e4, -1e4], [-1e4, 1e4], [1e4, 1e4], [0.0, 0.0]]], dtype=dtype, device=device)
    noise = torch.tensor([[0.0, 1.0, 0.5, 1e-30]], device=device)
    for kwargs in ({"noise": noise}, {}, {"sample": False}):
        x = logits.clone().requires_grad_()
        out = spottune_ext.gumbel_st(x, 0.01, backend=backend, **kwargs)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert out[0, 0] == 0 and out[0, 1] == 1


def test_empty_batch(backend_device):
    backend, device = backend_device
    x = torch.zeros(0, 4, 2, device=device, requires_grad=True)
    out = spottune_ext.gumbel_st(x, 1.0, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 4) and x.grad.shape == (0, 4, 2)


def test_compile_fullgraph():
    logits, noise = _inputs(16, 8, seed=8)

    def f(x, u):
        return spottune_ext.gumbel_st(x, 5.0, noise=u) * 2, spottune_ext.gumbel_st(x * 3, 5.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_()
    a, b = compiled(x, noise)
    (a.sum() + b.sum()).backward()
    assert torch.equal(a, f(logits, noise)[0])
    assert set(b.unique().tolist()) <= {0.0, 1.0} and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad,err,match", [
    (torch.zeros(4, 2), ValueError, r"\[B, L, 2\]"),
    (torch.zeros(4, 3, 3), ValueError, r"\[B, L, 2\]"),
    (torch.zeros(4, 3, 2, dtype=torch.int64), TypeError, "floating"),
    ([[0.0, 1.0]], TypeError, "tensor"),
])
def test_bad_logits_raise(bad, err, match):
    with pytest.raises(err, match=match):
        spottune_ext.gumbel_st(bad, 1.0)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        spottune_ext.gumbel_st(torch.zeros(2, 3, 2), tau)


def test_bad_noise_and_backend_raise():
    logits = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match=r"noise of shape \[B, L\]"):
        spottune_ext.gumbel_st(logits, 1.0, noise=torch.rand(3, 2))
    with pytest.raises(TypeError, match="float32 noise"):
        spottune_ext.gumbel_st(logits, 1.0, noise=torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown backend"):
        spottune_ext.gumbel_st(logits, 1.0, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA tensors"):
            spottune_ext.gumbel_st(logits, 1.0, backend="cuda")
