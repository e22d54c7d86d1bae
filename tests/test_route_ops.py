"""route_plan, gather_rows and combine_rows on every backend, against spottune_ext.reference.

Row copies, masks and add + ReLU (computed in float32 for half types, rounded once) are exact in
every dtype, so outputs and gradients are compared for equality.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

import spottune_ext as se
from spottune_ext import reference
from spottune_ext.triton import route_plan as triton_route_plan

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (backend, device) pairs: every implementation on every device it runs on; the CUDA ones join
# where a CUDA device is present.
KERNELS = [pytest.param("cpp", "cpu", id="cpp-cpu"),
           pytest.param("triton", "cpu", id="triton-cpu", marks=needs_interpreter)]
BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu")]
if CUDA:
    KERNELS += [pytest.param("cuda", "cuda", id="cuda-cuda"), pytest.param("triton", "cuda", id="triton-cuda")]
    BACKENDS += [pytest.param("torch", "cuda", id="torch-cuda")]
BACKENDS += KERNELS
VARIANTS = [pytest.param("", id="cpp"), pytest.param("_triton", id="triton")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]


def make(shape, dtype=torch.float32, device="cpu", layout="nchw", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def perm(n, device="cpu", seed=0):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def decisions_for(B, L, pattern, dtype=torch.float32, device="cpu", seed=0):
    if pattern == "zeros":
        d = torch.zeros(B, L)
    elif pattern == "ones":
        d = torch.ones(B, L)
    else:
        d = (torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
    return d.to(dtype=dtype, device=device)


def assert_rows_equal(out, ref, backend, device, arithmetic):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    fmt = reference.row_memory_format(ref)
    assert out.is_contiguous(memory_format=fmt), f"output lost the memory format {fmt}"
    if backend == "triton" and device == "cpu" and out.dtype == torch.bfloat16 and arithmetic:
        # The Triton interpreter truncates float32 -> bfloat16 where compiled Triton and torch round
        # to nearest even: allow one bfloat16 ulp there only.
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)  # exact (NaN == NaN)


# ----------------------------------------------------------------------------------------------
# route_plan

ROUTE_SHAPES = [(1, 1), (1, 6), (2, 1), (7, 5), (16, 16), (33, 4), (300, 3), (0, 3), (4, 0)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,L", ROUTE_SHAPES)
@pytest.mark.parametrize("pattern", ["random", "zeros", "ones"])
@pytest.mark.parametrize("chain", [False, True])
def test_route_plan_matches_reference(backend, device, B, L, pattern, chain):
    d = decisions_for(B, L, pattern, device=device, seed=B * 100 + L)
    plan = se.route_plan(d, chain=chain, backend=backend)
    order, dest, counts = reference.route_plan(d, chain)
    assert plan.order.dtype == plan.dest.dtype == torch.int64
    assert torch.equal(plan.order, order) and torch.equal(plan.dest, dest)
    assert plan.counts == counts[:L].tolist() and all(type(c) is int for c in plan.counts)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_plan_dtypes(backend, device, dtype):
    d = decisions_for(9, 4, "random", dtype=dtype, device=device, seed=3)
    plan = se.route_plan(d, chain=True, backend=backend)
    order, dest, counts = reference.route_plan(d.float(), True)
    assert torch.equal(plan.order, order) and torch.equal(plan.dest, dest) and plan.counts == counts[:4].tolist()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,L", [(1, 1), (5, 3), (16, 16), (300, 4)])
def test_route_plan_semantics(backend, device, B, L):
    """Independent of the reference: a stable partition, and chained dest lands in the next order."""
    d = decisions_for(B, L, "random", device=device, seed=B + L)
    plain = se.route_plan(d, chain=False, backend=backend)
    chained = se.route_plan(d, chain=True, backend=backend)
    assert torch.equal(plain.order, chained.order) and torch.equal(plain.dest, plain.order)
    for l in range(L):
        o = plain.order[l].cpu()
        routes = d[:, l].cpu()[o]
        n_frozen = B - plain.counts[l]
        assert plain.counts[l] == int(d[:, l].sum())
        assert (routes[:n_frozen] == 0).all() and (routes[n_frozen:] == 1).all()
        assert (o[:n_frozen].diff() > 0).all() and (o[n_frozen:].diff() > 0).all()  # batch order kept
        nxt = chained.order[l + 1].cpu() if l + 1 < L else torch.arange(B)
        assert torch.equal(nxt[chained.dest[l].cpu()], o)  # row i goes where image order[l, i] is next


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("chain", [False, True])
def test_route_plan_counts_invalid_decisions(backend, device, chain):
    d = decisions_for(11, 5, "random", device=device, seed=7)
    d[0, 0], d[3, 2], d[4, 2], d[10, 4], d[5, 1] = 0.5, -1.0, 2.0, float("nan"), float("inf")
    got = se.backends.kernel("route_plan", backend)(d, chain)
    want = reference.route_plan(d, chain)
    assert got[2][-1].item() == 5
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_route_plan_rejects_non_binary_decisions(backend, device, bad):
    d = decisions_for(6, 3, "random", device=device)
    d[2, 1] = bad
    with pytest.raises(ValueError, match="exactly 0 or 1, got 1 other"):
        se.route_plan(d, backend=backend)


@needs_interpreter
@pytest.mark.parametrize("chain", [False, True])
def test_route_plan_triton_tiles(monkeypatch, chain):
    """Batches longer than one Triton tile carry the prefix sum across tiles."""
    monkeypatch.setattr(triton_route_plan, "MAX_BLOCK", 16)
    d = decisions_for(53, 4, "random", seed=11)
    plan = se.route_plan(d, chain=chain, backend="triton")
    order, dest, _ = reference.route_plan(d, chain)
    assert torch.equal(plan.order, order) and torch.equal(plan.dest, dest)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_route_plan_takes_decisions_that_require_grad(backend, device):
    logits = torch.randn(8, 4, 2, device=device, requires_grad=True)
    hard = se.gumbel_st(logits, noise=torch.rand(8, 4, device=device))
    plan = se.route_plan(hard, chain=True, backend=backend)
    assert plan.counts == hard.detach().sum(0).long().tolist()


# ----------------------------------------------------------------------------------------------
# gather_rows

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_gather_rows_matches_reference(backend, device, dtype, layout, masked):
    x = make((5, 3, 4, 6), dtype, device, layout, seed=1)
    mask = make((5, 3, 4, 6), dtype, device, layout, seed=2) if masked else None
    index = perm(5, device, seed=3)
    out = se.gather_rows(x, index, mask, backend=backend)
    assert_rows_equal(out, reference.gather_rows(x, index, mask), backend, device, arithmetic=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gather_rows_mask_zeroes_non_finite_values(backend, device):
    """As torch.relu's backward: a masked-out entry is 0 even where x is inf or NaN."""
    x = torch.tensor([[float("inf"), float("nan"), 2.0], [3.0, -float("inf"), float("nan")]], device=device)
    mask = torch.tensor([[0.0, -1.0, 1.0], [0.5, 0.0, 1.0]], device=device)
    out = se.gather_rows(x, torch.tensor([1, 0], device=device), mask, backend=backend)
    want = torch.tensor([[3.0, 0.0, float("nan")], [0.0, 0.0, 2.0]], device=device)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())


# ----------------------------------------------------------------------------------------------
# combine_rows

SPLITS = [(2, 3), (0, 5), (5, 0)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_combine_rows_matches_reference(backend, device, dtype, layout, with_residual, relu):
    for n0, n1 in SPLITS:
        src = make((5, 3, 4, 6), dtype, device, layout, seed=n0)
        residual = make((5, 3, 4, 6), dtype, device, layout, seed=9) if with_residual else None
        dest = perm(5, device, seed=n1)
        src0, src1 = src[:n0], src[n0:]
        out = se.combine_rows(src0, src1, dest, residual, relu, backend=backend)
        want = reference.combine_rows(src0, src1, dest, residual, relu)
        assert_rows_equal(out, want, backend, device, arithmetic=with_residual)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_combine_rows_relu_keeps_nan(backend, device):
    src = torch.tensor([[float("nan"), -1.0], [2.0, -0.0]], device=device)
    out = se.combine_rows(src[:1], src[1:], torch.tensor([1, 0], device=device), relu=True, backend=backend)
    assert out[1, 0].isnan() and torch.equal(out[0], torch.tensor([2.0, 0.0], device=device)) and out[1, 1] == 0


SPECIAL = [float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 1e-40, -1e-40, 6e4, -6e4, 3e38, -3e38, 1.0, -1.0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy sees the overflows
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(backend, device, dtype):
    """inf, NaN, signed zeros, subnormals and overflowing sums behave as in torch, in every dtype."""
    values = torch.tensor(SPECIAL)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        values = values[values.abs() != 1e-40]  # the Triton interpreter flushes bfloat16 subnormals to 0
    n = len(values)
    a = values.repeat(n).view(n, n).to(dtype=dtype, device=device)  # a[i, j] = SPECIAL[j]
    b = values.repeat_interleave(n).view(n, n).to(dtype=dtype, device=device)  # b[i, j] = SPECIAL[i]
    index = perm(n, device, seed=5)
    for mask in (None, b):
        assert_rows_equal(se.gather_rows(a, index, mask, backend=backend), reference.gather_rows(a, index, mask),
                          backend, device, arithmetic=False)
    for residual in (None, b):
        for relu in (False, True):
            out = se.combine_rows(a[:4], a[4:], index, residual, relu, backend=backend)
            assert_rows_equal(out, reference.combine_rows(a[:4], a[4:], index, residual, relu), backend, device,
                              arithmetic=residual is not None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_rows(backend, device, dtype):
    """Samples longer than a CPU work chunk or a Triton block, of a length that divides neither."""
    x = make((3, 70001), dtype, device, seed=1)
    mask = make((3, 70001), dtype, device, seed=2)
    index = perm(3, device, seed=3)
    assert_rows_equal(se.gather_rows(x, index, mask, backend=backend), reference.gather_rows(x, index, mask),
                      backend, device, arithmetic=False)
    out = se.combine_rows(x[:1], x[1:], index, mask, True, backend=backend)
    assert_rows_equal(out, reference.combine_rows(x[:1], x[1:], index, mask, True), backend, device,
                      arithmetic=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_layouts_follow_the_first_source(backend, device):
    src0 = make((2, 3, 4, 5), layout="channels_last", device=device, seed=1)
    src1 = make((3, 3, 4, 5), device=device, seed=2)
    residual = make((5, 3, 4, 5), device=device, seed=3)
    dest = perm(5, device)
    out = se.combine_rows(src0, src1, dest, residual, True, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference.combine_rows(src0, src1, dest, residual, True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    x = make((4, 3, 8, 5), device=device)[:, :, ::2]
    mask = make((4, 6, 4, 5), device=device, seed=4)[:, ::2]
    index = perm(4, device, seed=1)
    out = se.gather_rows(x, index, mask, backend=backend)
    assert out.is_contiguous() and torch.equal(out, reference.gather_rows(x, index, mask))
    res = make((4, 3, 4, 10), device=device, seed=5)[..., ::2]
    out = se.combine_rows(x[:1], x[1:], index, res, True, backend=backend)
    assert out.is_contiguous() and torch.equal(out, reference.combine_rows(x[:1], x[1:], index, res, True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_randomized_shapes(backend, device):
    g = torch.Generator().manual_seed(1234)
    for trial in range(6):
        B = int(torch.randint(1, 10, (), generator=g))
        sample = [int(s) for s in torch.randint(1, 7, (int(torch.randint(0, 4, (), generator=g)),), generator=g)]
        layout = "channels_last" if len(sample) == 3 and trial % 2 else "nchw"
        x = make((B, *sample), device=device, layout=layout, seed=trial)
        mask = make((B, *sample), device=device, layout=layout, seed=trial + 50)
        index = perm(B, device, seed=trial)
        n0 = int(torch.randint(0, B + 1, (), generator=g))
        for m in (None, mask):
            assert_rows_equal(se.gather_rows(x, index, m, backend=backend), reference.gather_rows(x, index, m),
                              backend, device, arithmetic=False)
        out = se.combine_rows(x[:n0], x[n0:], index, mask, True, backend=backend)
        assert_rows_equal(out, reference.combine_rows(x[:n0], x[n0:], index, mask, True), backend, device,
                          arithmetic=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batch_of_one(backend, device):
    x = make((1, 3, 2, 2), device=device, layout="channels_last")
    index = torch.zeros(1, dtype=torch.int64, device=device)
    assert torch.equal(se.gather_rows(x, index, x, backend=backend), torch.where(x > 0, x, 0))
    out = se.combine_rows(x[:0], x, index, x, True, backend=backend)
    assert torch.equal(out, torch.relu(x + x)) and out.is_contiguous(memory_format=torch.channels_last)
    plan = se.route_plan(torch.ones(1, 3, device=device), chain=True, backend=backend)
    assert plan.counts == [1, 1, 1] and plan.order.tolist() == plan.dest.tolist() == [[0], [0], [0]]


def test_auto_backend_matches_reference():
    d = decisions_for(8, 3, "random")
    plan = se.route_plan(d, chain=True)
    order, dest, counts = reference.route_plan(d, True)
    assert torch.equal(plan.order, order) and torch.equal(plan.dest, dest) and plan.counts == counts[:3].tolist()
    x = make((8, 3, 2, 2), layout="channels_last")
    assert torch.equal(se.gather_rows(x, order[0], x), reference.gather_rows(x, order[0], x))
    out = se.combine_rows(x[:5], x[5:], dest[0], x, True)
    assert torch.equal(out, reference.combine_rows(x[:5], x[5:], dest[0], x, True))


# ----------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_gradients_match_reference(backend, device, layout, with_residual, relu):
    """A block's combine (grouped -> next order) followed by a masked gather, as in a routed network."""
    def run(combine, gather):
        src = make((6, 3, 4, 5), device=device, layout=layout, seed=1).requires_grad_()
        res = make((6, 3, 4, 5), device=device, layout=layout, seed=2).requires_grad_()
        x = make((6, 3, 4, 5), device=device, layout=layout, seed=3).requires_grad_()
        mask = make((6, 3, 4, 5), device=device, layout=layout, seed=4)
        out = combine(src[:2], src[2:], perm(6, device, 1), res if with_residual else None, relu)
        y = gather(out * x, perm(6, device, 2), mask)
        (y * make((6, 3, 4, 5), device=device, seed=5)).sum().backward()
        return src.grad, res.grad, x.grad

    got = run(lambda *a: se.combine_rows(*a, backend=backend), lambda *a: se.gather_rows(*a, backend=backend))
    want = run(reference.combine_rows, reference.gather_rows)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend, device, layout):
    f64 = dict(dtype=torch.float64, device=device, layout=layout)
    x = make((4, 2, 2, 3), seed=1, **f64).requires_grad_()
    mask = make((4, 2, 2, 3), seed=2, **f64)
    index = perm(4, device, seed=3)
    assert torch.autograd.gradcheck(lambda x: se.gather_rows(x, index, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda x: se.gather_rows(x, index, mask, backend=backend), (x,))
    src0 = make((1, 2, 2, 3), seed=4, **f64).requires_grad_()
    src1 = make((3, 2, 2, 3), seed=5, **f64).requires_grad_()
    res = make((4, 2, 2, 3), seed=6, **f64).requires_grad_()
    for relu in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, r: se.combine_rows(a, b, index, r, relu, backend=backend), (src0, src1, res))
    assert torch.autograd.gradcheck(lambda a, b: se.combine_rows(a, b, index, None, True, backend=backend),
                                    (src0, src1))
    # Double backward runs the ops' backward through the ops themselves (gather <-> combine).
    assert torch.autograd.gradgradcheck(
        lambda a, b, r: se.combine_rows(a, b, index, r, True, backend=backend), (src0, src1, res), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x: se.gather_rows(x, index, mask, backend=backend), (x,),
                                        fast_mode=True)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, dynamic shapes

def _variant(suffix):
    if suffix == "_triton" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if suffix == "_triton":  # the Triton variants are defined on first use
        for name in ("route_plan", "gather_rows", "combine_rows"):
            se.backends.kernel(name, "triton")
    return lambda name: getattr(torch.ops.spottune_ext, name + suffix)


@pytest.mark.parametrize("suffix", VARIANTS)
def test_opcheck(suffix):
    op = _variant(suffix)
    x = make((6, 3, 4, 5), layout="channels_last").requires_grad_()
    mask = make((6, 3, 4, 5), seed=1)
    res = make((6, 3, 4, 5), seed=2).requires_grad_()
    index = perm(6)
    opcheck(op("route_plan"), (decisions_for(6, 4, "random"), False))
    opcheck(op("route_plan"), (decisions_for(6, 4, "random"), True))
    opcheck(op("gather_rows"), (x, index, None))
    opcheck(op("gather_rows"), (x, index, mask))
    opcheck(op("gather_rows"), (make((6, 7)).requires_grad_(), index, None))
    opcheck(op("combine_rows"), (x[:2], x[2:], index, res, True))
    opcheck(op("combine_rows"), (x[:0], x, index, None, False))
    opcheck(op("combine_rows"), (make((4, 7)).requires_grad_(), make((2, 7)), index, None, True))


# ----------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input_errors(backend, device):
    x = make((4, 3, 2, 2), device=device)
    index = perm(4, device)
    meta_index = torch.arange(4, device="meta")
    with pytest.raises(TypeError, match="floating decisions"):
        se.route_plan(torch.ones(4, 3, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"shape \[B, L\]"):
        se.route_plan(torch.ones(4, device=device), backend=backend)
    with pytest.raises(TypeError, match="as a tensor"):
        se.route_plan([[0.0, 1.0]], backend=backend)
    with pytest.raises(TypeError, match="int64"):
        se.gather_rows(x, index.int(), backend=backend)
    with pytest.raises(ValueError, match=r"shape \[B\] = \[4\]"):
        se.gather_rows(x, index[:3], backend=backend)
    with pytest.raises(ValueError, match="on x's device"):
        se.gather_rows(x, meta_index, backend=backend)
    with pytest.raises(TypeError, match="floating x"):
        se.gather_rows(x.long(), index, backend=backend)
    with pytest.raises(ValueError, match="mask of x's shape"):
        se.gather_rows(x, index, x[:, :2], backend=backend)
    with pytest.raises(TypeError, match="mask of x's dtype"):
        se.gather_rows(x, index, x.double(), backend=backend)
    with pytest.raises(ValueError, match="src1 of shape"):
        se.combine_rows(x[:2], x[2:, :2], index, backend=backend)
    with pytest.raises(TypeError, match="src1 of src0's dtype"):
        se.combine_rows(x[:2], x[2:].double(), index, backend=backend)
    with pytest.raises(ValueError, match=r"dest of shape \[rows\(src0\) \+ rows\(src1\)\] = \[4\]"):
        se.combine_rows(x[:2], x[2:], index[:3], backend=backend)
    with pytest.raises(TypeError, match="dest as an int64"):
        se.combine_rows(x[:2], x[2:], index.float(), backend=backend)
    with pytest.raises(ValueError, match="dest on src0's device"):
        se.combine_rows(x[:2], x[2:], meta_index, backend=backend)
    with pytest.raises(ValueError, match=r"residual of shape \[4, 3, 2, 2\]"):
        se.combine_rows(x[:2], x[2:], index, x[:3], backend=backend)
    with pytest.raises(TypeError, match="residual of src0's dtype"):
        se.combine_rows(x[:2], x[2:], index, x.half(), backend=backend)
    with pytest.raises(TypeError, match="x as a tensor"):
        se.gather_rows(x.tolist(), index, backend=backend)
    with pytest.raises(ValueError, match="batch dimension"):
        se.combine_rows(x[0, 0, 0, 0], x, index, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        se.gather_rows(x, index, backend="fast")


def test_backend_device_errors():
    x = make((4, 3))
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        se.gather_rows(x, perm(4), backend="cuda")
    if CUDA:
        with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors"):
            se.combine_rows(x.cuda(), x[:0].cuda(), perm(4, "cuda"), backend="cpp")


def test_cpp_kernels_check_permutations_and_shapes():
    x = make((4, 3))
    ops = torch.ops.spottune_ext
    with pytest.raises(RuntimeError, match=r"index must be a permutation of range\(4\), but 2 appears twice"):
        se.gather_rows(x, torch.tensor([0, 2, 2, 1]), backend="cpp")
    with pytest.raises(RuntimeError, match=r"dest must be a permutation of range\(4\), but dest\[1\] = 4"):
        se.combine_rows(x[:1], x[1:], torch.tensor([0, 4, 2, 1]), backend="cpp")
    with pytest.raises(RuntimeError, match=r"index must have shape \[4\]"):
        ops.gather_rows(x, torch.arange(3), None)
    with pytest.raises(RuntimeError, match="index must be int64"):
        ops.gather_rows(x, torch.arange(4, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="mask must have dtype Float"):
        ops.gather_rows(x, torch.arange(4), x.double())
    with pytest.raises(RuntimeError, match="same sample shape"):
        ops.combine_rows(x[:1], make((3, 2)), torch.arange(4), None, False)
    with pytest.raises(RuntimeError, match=r"residual must have shape \[4, 3\]"):
        ops.combine_rows(x[:1], x[1:], torch.arange(4), x[:2], False)
    with pytest.raises(RuntimeError, match=r"decisions must have shape \[B, L\]"):
        ops.route_plan(torch.ones(3), False)


# ----------------------------------------------------------------------------------------------
# Triton kernels compile for a GPU (the interpreter accepts programs the compiler rejects)

_COMPILE = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spottune_ext.triton import combine_rows, gather_rows, gumbel_st, route_plan

    def build(fn, signature, constexprs):
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

    for dt, acc in (("*fp32", tl.float32), ("*fp16", tl.float32), ("*bf16", tl.float32), ("*fp64", tl.float64)):
        for chain in (False, True):
            build(route_plan._route_plan_kernel,
                  dict(d_ptr=dt, order_ptr="*i64", dest_ptr="*i64", counts_ptr="*i64", B="i32", L="i32",
                       CHAIN="constexpr", BLOCK="constexpr"), dict(CHAIN=chain, BLOCK=64))
        for masked in (False, True):
            build(gather_rows._gather_rows_kernel,
                  dict(x_ptr=dt, index_ptr="*i64", mask_ptr=dt, out_ptr=dt, row_size="i32", HAS_MASK="constexpr",
                       BLOCK="constexpr"), dict(HAS_MASK=masked, BLOCK=1024))
        for residual in (False, True):
            for relu in (False, True):
                build(combine_rows._combine_rows_kernel,
                      dict(src_ptr=dt, dest_ptr="*i64", res_ptr=dt, out_ptr=dt, row_size="i32",
                           HAS_RESIDUAL="constexpr", RELU="constexpr", ACC="constexpr", BLOCK="constexpr"),
                      dict(HAS_RESIDUAL=residual, RELU=relu, ACC=acc, BLOCK=1024))
        acc_ptr = "*fp64" if acc == tl.float64 else "*fp32"
        for sample, use_noise in ((False, False), (True, False), (True, True)):
            build(gumbel_st._gumbel_st_kernel,
                  dict(logits_ptr=dt, noise_ptr="*fp32", seed_ptr="*i64", hard_ptr=dt, soft_ptr=acc_ptr, n="i32",
                       inv_tau_ptr=acc_ptr, SAMPLE="constexpr", USE_NOISE="constexpr", ACC="constexpr",
                       EPS="constexpr", BLOCK="constexpr"),
                  dict(SAMPLE=sample, USE_NOISE=use_noise, ACC=acc, EPS=gumbel_st.UNIFORM_EPS, BLOCK=1024))
        build(gumbel_st._gumbel_st_backward_kernel,
              dict(grad_ptr=dt, soft_ptr=acc_ptr, out_ptr=dt, n="i32", inv_tau_ptr=acc_ptr, ACC="constexpr",
                   BLOCK="constexpr"), dict(ACC=acc, BLOCK=1024))
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a CUDA machine the Triton tests compile and run the kernels")
def test_triton_kernels_compile_for_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
