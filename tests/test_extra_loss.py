"""Strategies' extra loss terms (Global-k, L2-SP) reach the gradients of a loop that never calls
model.extra_loss(), exactly as the explicit `loss + model.extra_loss()` loop's."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import spottune_ext as st


pytestmark = pytest.mark.usefixtures("one_thread")


STRATEGIES = {"global_k": {"k": 1, "lambda1": 2.0, "lambda2": 0.5}, "l2sp": {"alpha": 0.3, "beta": 0.2}}


def _net(strategy):
    torch.manual_seed(0)
    backbone = st.models.DecathlonResNet(10, layers=(1, 1, 1), widths=(8, 16, 32), stem_width=8)
    policy = {"widths": (8, 16), "stem_width": 8} if strategy == "global_k" else None
    net = st.convert(backbone, num_classes=3, strategy=strategy, policy=policy, **STRATEGIES[strategy])
    if strategy == "l2sp":  # move away from the anchor so that the penalty has a gradient
        with torch.no_grad():
            for p in net.backbone.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net.train()


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.arange(4) % 3) for _ in range(n)]


def _grads(net, batches, loss_fn):
    """Accumulates the gradients of loss_fn over the batches (one seed per batch for the policy's noise)."""
    net.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(100 + i)
        loss_fn(net, net(x), y).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def _task(net, logits, y):
    return F.cross_entropy(logits, y)


def _explicit(net, logits, y):
    return F.cross_entropy(logits, y) + net.extra_loss()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_unmodified_loop_gets_the_explicit_gradients(strategy):
    net = _net(strategy)
    explicit_net = copy.deepcopy(net)
    explicit_net.attach_extra_loss = False
    batches = _batches(1)
    unmodified = _grads(net, batches, _task)
    explicit = _grads(explicit_net, batches, _explicit)
    _assert_same(unmodified, explicit)
    # the extra terms changed the gradients (else the comparison proves nothing)
    without = _grads(explicit_net, batches, _task)
    assert any(not torch.allclose(unmodified[n], without[n]) for n in without)
    # the attached model's loop may add extra_loss() too (same value): counted once
    _assert_same(_grads(net, batches, _explicit), explicit)
    assert torch.equal(net.extra_loss().detach(), explicit_net.extra_loss().detach())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_gradient_accumulation(strategy):
    net = _net(strategy)
    explicit_net = copy.deepcopy(net)
    explicit_net.attach_extra_loss = False
    batches = _batches(3)
    expected = _grads(explicit_net, batches, lambda n, out, y: _explicit(n, out, y) / 3)
    # a loop that divides its loss by N and adds extra_loss() needs nothing
    _assert_same(_grads(net, batches, lambda n, out, y: _explicit(n, out, y) / 3), expected)
    # one that does not add it tells the model its scale
    net.extra_loss_scale = 1 / 3
    _assert_same(_grads(net, batches, lambda n, out, y: _task(n, out, y) / 3), expected)


def test_compiled_model():
    net = _net("l2sp")
    explicit_net = copy.deepcopy(net)
    explicit_net.attach_extra_loss = False
    expected = _grads(explicit_net, _batches(1), _explicit)
    compiled = torch.compile(net, backend="aot_eager")
    x, y = _batches(1)[0]
    for loss_fn in (_task, _explicit):
        net.zero_grad(set_to_none=True)
        loss_fn(net, compiled(x), y).backward()
        _assert_same({n: p.grad for n, p in net.named_parameters() if p.grad is not None}, expected)


def test_logits_can_be_modified_in_place():
    net = _net("l2sp")
    explicit_net = copy.deepcopy(net)
    explicit_net.attach_extra_loss = False
    batches = _batches(1)
    expected = _grads(explicit_net, batches, lambda n, out, y: _explicit(n, out.div_(2), y))
    _assert_same(_grads(net, batches, lambda n, out, y: _task(n, out.div_(2), y)), expected)


def test_logging_only_keeps_the_attached_gradient():
    net = _net("global_k")
    explicit_net = copy.deepcopy(net)
    explicit_net.attach_extra_loss = False
    batches = _batches(1)

    def logged(n, out, y):
        assert n.extra_loss().item() > 0
        return _task(n, out, y)

    _assert_same(_grads(net, batches, logged), _grads(explicit_net, batches, _explicit))


def test_no_attachment_without_grad_and_copies_drop_the_graph():
    net = _net("global_k")
    x, y = _batches(1)[0]
    _task(net, net(x), y).backward()
    assert net.extra_loss().grad_fn is not None
    assert copy.deepcopy(net._attached).extra is None  # a copy of the model does not share the graph
    assert pickle.loads(pickle.dumps(net._attached)).extra is None
    with torch.no_grad():
        net(x)
    assert net._attached.extra is None and net.extra_loss().grad_fn is None


def test_float16_autocast_warns_when_the_loop_may_scale_the_loss():
    net = _net("l2sp")
    x, y = _batches(1)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        unmodified, explicit = _task(net, net(x), y), _explicit(net, net(x), y)
    with pytest.warns(UserWarning, match="GradScaler"):
        unmodified.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit.backward()  # the loop adds extra_loss(): its own scaling applies, nothing to warn about


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for strategy in STRATEGIES:
        net = torch.nn.parallel.DistributedDataParallel(_net(strategy))
        x, y = _batches(world)[rank]
        torch.manual_seed(100 + rank)
        F.cross_entropy(net(x), y).backward()  # the unmodified loop
        grads = {n: p.grad for n, p in net.module.named_parameters() if p.grad is not None}
        torch.save(grads, f"{out_dir}/{strategy}-{rank}.pt")
    torch.distributed.destroy_process_group()


def test_distributed_data_parallel(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    for strategy in STRATEGIES:
        # the explicit loop's DDP gradient: the mean over processes of each one's (task + extra) gradient
        explicit_net = _net(strategy)
        explicit_net.attach_extra_loss = False
        per_rank = []
        for rank, (x, y) in enumerate(_batches(2)):
            explicit_net.zero_grad(set_to_none=True)
            torch.manual_seed(100 + rank)
            _explicit(explicit_net, explicit_net(x), y).backward()
            per_rank.append({n: p.grad.clone() for n, p in explicit_net.named_parameters() if p.grad is not None})
        expected = {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in per_rank[0]}
        for rank in range(2):
            _assert_same(torch.load(tmp_path / f"{strategy}-{rank}.pt"), expected)
