"""torch.compile of converted models: one graph per forward (fullgraph=True), no recompilation when
the route split changes, and the values, gradients and BatchNorm statistics of eager execution."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torchvision.models.resnet import BasicBlock

import spottune_ext as st
from spottune_ext.models.resnet26 import DecathlonResNet

BATCH = 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _model(execution="grouped", train=True):
    torch.manual_seed(0)
    backbone = DecathlonResNet(5, (1, 1, 1), (8, 16, 16), 8)
    return st.convert(backbone, policy={"widths": (8, 16), "stem_width": 8}, execution=execution).train(train)


def _batches(n, seed=1):
    """n batches of random routes; the first ones send a whole block's batch one way (an empty
    sub-batch), or a single image to the tuned copy."""
    g = torch.Generator().manual_seed(seed)
    special = [torch.zeros(BATCH), torch.ones(BATCH), torch.eye(BATCH)[0]]
    for i in range(n):
        x = torch.randn(BATCH, 3, 16, 16, generator=g)
        d = torch.randint(0, 2, (BATCH, 3), generator=g).float()
        if i < len(special):
            d[:, i] = special[i]
        yield x, d


def _step(model, run, x, d, train):
    """One forward (and backward in training): output, decision gradient, parameter gradients, buffers."""
    d = d.clone().requires_grad_(train)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        out = run(x, d)
        if train:
            (out * torch.arange(1.0, 6.0)).sum().backward()
    return (out.detach(), d.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    if expected[1] is not None:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
    for name, grad in expected[2].items():
        if grad is None:
            assert got[2][name] is None, name
        else:
            torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for name, buffer in expected[3].items():
        torch.testing.assert_close(got[3][name], buffer, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _compare(backend, train, execution="grouped", batches=20):
    model = _model(execution, train)
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for x, d in _batches(batches):
        _assert_same(_step(model, compiled, x, d, train), _step(eager, eager, x, d, train))
    return counter


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("execution", ["grouped", "dense"])
def test_one_graph_for_every_route_split(train, execution):
    """20 batches of different route splits (empty and one-image sub-batches among them): one graph,
    compiled once, with eager's outputs, decision and parameter gradients and running statistics."""
    counter = _compare("aot_eager", train, execution)
    assert counter.frame_count == 1  # a recompilation or a graph break would add frames


def test_policy_decisions_in_the_graph():
    """The policy's sampled decisions and the route plan of each batch inside the same graph."""
    model = _model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    splits = set()
    for x, _ in _batches(10):
        compiled(x).sum().backward()
        splits.add(tuple(model.last_policy.sum(0).tolist()))
    assert len(splits) > 5 and counter.frame_count == 1


def test_invalid_decisions_raise_in_the_compiled_graph():
    compiled = torch.compile(_model(train=False), backend="aot_eager", fullgraph=True)
    x = torch.randn(BATCH, 3, 16, 16)
    compiled(x, torch.zeros(BATCH, 3))
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        compiled(x, torch.full((BATCH, 3), 0.5))


def test_inductor_training_step():
    """The default backend, generated code included. On the CPU, inductor's layout optimisation must
    be off (README, torch.compile): it makes convolutions channels-last while the fake convolution
    of a data-dependent batch size, which may be 0, gives a contiguous output."""
    with torch._inductor.config.patch(layout_optimization=False):
        counter = _compare("inductor", True, batches=4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_sub_batches_without_batch_statistics(frozen_bn):
    """A routed block at 1x1 spatial size: a one-image sub-batch has one value per channel and uses
    the running statistics (and leaves them), as in eager execution, in the same graph as the others."""
    torch.manual_seed(0)
    block = st.RoutedBasicBlock(BasicBlock(4, 4), frozen_bn=frozen_bn).train()
    eager = copy.deepcopy(block)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x = torch.randn(4, 4, 1, 1)
    for d in ([1.0, 0, 0, 0], [0.0, 1, 1, 0], [1.0, 1, 1, 0], [0.0, 0, 0, 0]):
        d = torch.tensor(d)
        got, expected = (_step(m, run, x, d, True) for m, run in ((block, compiled), (eager, eager)))
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
        for name, buffer in expected[3].items():
            torch.testing.assert_close(got[3][name], buffer, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert counter.frame_count == 1


def test_a_new_batch_size_compiles_one_dynamic_graph():
    model = _model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    graphs = []
    for batch in (8, 8, 6, 5, 7, 3, 8):
        compiled(torch.randn(batch, 3, 16, 16)).sum().backward()
        graphs.append(counter.frame_count)
    assert graphs == [1, 1, 2, 2, 2, 2, 2]


def test_compiled_under_autocast():
    """bfloat16 autocast around the compiled model: one graph, eager autocast's values and gradients."""
    model = _model()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for x, d in _batches(5):
        results = []
        for run in (compiled, eager):
            d_grad = d.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(x, d_grad)
            out.float().sum().backward()  # outside autocast, as recommended
            results.append((out.detach(), d_grad.grad))
        (out, d_grad), (out_eager, d_grad_eager) = results
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, out_eager, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(d_grad, d_grad_eager, rtol=2e-2, atol=0.1)
    assert counter.frame_count == 1
