"""Routed blocks (spottune_ext.routed) against the dense masked formulation and torchvision's blocks."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import spottune_ext
from spottune_ext import RoutedBasicBlock, RoutedBottleneck, RoutedInvertedResidual, run_blocks
from spottune_ext import routed as routed_module

from conftest import INTERPRET

CUDA = torch.cuda.is_available()
# (device, row-op backend): every implementation on every device it runs on; Triton runs on CPU
# tensors only through its interpreter, which tests/conftest.py turns on where there is no GPU.
DEVICE_BACKENDS = [("cpu", "torch"), ("cpu", "cpp")] + ([("cpu", "triton")] if INTERPRET else [])
if CUDA:
    DEVICE_BACKENDS += [("cuda", "torch"), ("cuda", "cuda"), ("cuda", "triton")]


def _conv1x1_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# (routed class, block factory, input channels): every shortcut kind of every block type.
BLOCKS = {
    "basic": (RoutedBasicBlock, lambda: BasicBlock(8, 8), 8),
    "basic_down": (RoutedBasicBlock, lambda: BasicBlock(8, 12, 2, _conv1x1_bn(8, 12, 2)), 8),
    "bottleneck": (RoutedBottleneck, lambda: Bottleneck(16, 4), 16),
    "bottleneck_down": (RoutedBottleneck, lambda: Bottleneck(8, 4, 2, _conv1x1_bn(8, 16, 2)), 8),
    "inverted_res": (RoutedInvertedResidual, lambda: InvertedResidual(8, 8, 1, 3), 8),
    "inverted_nores": (RoutedInvertedResidual, lambda: InvertedResidual(8, 12, 2, 6), 8),
    "inverted_t1": (RoutedInvertedResidual, lambda: InvertedResidual(8, 8, 1, 1), 8),
}


def _randomize_bn(module, scale=1.0):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2 * scale)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2 * scale)
                m.bias.normal_(0, 0.2 * scale)


def _perturb(module, scale=0.1):
    """Makes a tuned copy differ from its frozen copy (weights and BatchNorm statistics)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(scale * torch.randn_like(m.running_mean))
                m.running_var.mul_(1 + scale * torch.rand_like(m.running_var))


def _make(name, seed=0, dtype=torch.float32, **kwargs):
    """(routed block in eval mode, untouched copy of the original block, input channels)."""
    torch.manual_seed(seed)
    cls, factory, cin = BLOCKS[name]
    block = factory()
    _randomize_bn(block)
    block = block.to(dtype).eval()
    original = copy.deepcopy(block)
    routed = cls(block, **kwargs)
    _perturb(routed.tuned)
    return routed.eval(), original, cin


def _decisions(batch, kind, seed=0, columns=None):
    shape = (batch,) if columns is None else (batch, columns)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed)
    random = torch.randint(0, 2, shape, generator=g).float()
    if kind == "mixed":  # columns with one route for every image next to random ones, in every order
        random[:, 0::4], random[:, 1::4] = 1.0, 0.0
    return random


def _dense_copy(routed):
    dense = copy.deepcopy(routed)
    dense.execution = "dense"
    return dense


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("grad", [False, True])
def test_all_frozen_is_the_original_block_bit_for_bit(name, grad):
    routed, original, cin = _make(name)
    x = torch.randn(5, cin, 6, 6)
    with torch.set_grad_enabled(grad):
        assert torch.equal(routed(x, torch.zeros(5)), original(x))
        assert torch.equal(routed(x, torch.ones(5)), routed.tuned(x))
        routed.execution = "dense"
        assert torch.equal(routed(x, torch.zeros(5)), original(x))


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("batch,kind,seed", [(1, "random", 0), (1, "ones", 0), (4, "random", 1), (7, "random", 2),
                                             (7, "zeros", 0), (7, "ones", 0)])
def test_forward_matches_dense(name, batch, kind, seed):
    routed, _, cin = _make(name, seed)
    x = torch.randn(batch, cin, 7, 7)
    d = _decisions(batch, kind, seed)
    expected = _dense_copy(routed)(x, d)
    with torch.no_grad():
        torch.testing.assert_close(routed(x, d), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed(x, d), expected, rtol=1e-5, atol=1e-6)


def _loss_and_grads(module, x, d, weight):
    x = x.clone().requires_grad_(True)
    d = d.clone().requires_grad_(True)
    out = module(x, d)
    (out * weight).sum().backward()
    tuned = [p.grad for p in module.tuned.parameters()]
    return out.detach(), x.grad, d.grad, tuned


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("batch,kind,seed", [(5, "random", 0), (6, "random", 3), (5, "zeros", 0), (5, "ones", 0),
                                             (1, "random", 4)])
def test_gradients_match_dense(name, batch, kind, seed):
    routed, _, cin = _make(name, seed, dtype=torch.float64)
    dense = _dense_copy(routed)
    x = torch.randn(batch, cin, 6, 6, dtype=torch.float64)
    d = _decisions(batch, kind, seed).double()
    weight = torch.randn_like(routed(x, d))
    got = _loss_and_grads(routed, x, d, weight)
    expected = _loss_and_grads(dense, x, d, weight)
    for g, e in zip(got[:3], expected[:3]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    for g, e in zip(got[3], expected[3]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in routed.frozen.parameters())


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] != "torch"])
@pytest.mark.parametrize("name", ["basic", "bottleneck_down", "inverted_nores"])
def test_row_op_backends_agree_exactly(name, device, backend):
    """The row ops only move rows and fuse add + ReLU: every backend gives the same bits."""
    routed, _, cin = _make(name, 6)
    routed.to(device)
    other = copy.deepcopy(routed)
    routed.backend, other.backend = "torch", backend
    x = torch.randn(5, cin, 6, 6, device=device)
    d = torch.tensor([1.0, 0, 0, 1, 1], device=device)
    weight = torch.randn_like(routed(x, d))
    expected, got = (_loss_and_grads(m, x, d, weight) for m in (routed, other))
    for e, g in zip(expected[:3], got[:3]):
        assert torch.equal(e, g)
    assert all(torch.equal(e, g) for e, g in zip(expected[3], got[3]))
    _, modules = _resnet18_blocks(1)
    d = _decisions(3, "random", seed=2, columns=8).to(device)
    x = torch.randn(3, 64, 4, 4, device=device)
    for m in modules:
        m.to(device).eval().backend = "torch"
    with torch.no_grad():
        expected = run_blocks(modules, x, d, backend="torch")
        for m in modules:
            m.backend = backend
        assert torch.equal(run_blocks(modules, x, d, backend=backend), expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_matches_dense_on_every_backend(device, backend):
    for name in ("bottleneck_down", "inverted_res"):
        routed, _, cin = _make(name, 7, dtype=torch.float64, backend=backend)
        routed.to(device)
        dense = _dense_copy(routed)
        x = torch.randn(6, cin, 5, 5, dtype=torch.float64, device=device)
        d = torch.tensor([0.0, 1, 1, 0, 1, 0], dtype=torch.float64, device=device)
        weight = torch.randn_like(routed(x, d))
        got, expected = (_loss_and_grads(m, x, d, weight) for m in (routed, dense))
        for g, e in zip((*got[:3], *got[3]), (*expected[:3], *expected[3])):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    _, modules = _resnet18_blocks(3)
    modules = [m.double().to(device).eval() for m in modules]
    for m in modules:
        m.backend = backend
    x = torch.randn(5, 64, 6, 6, dtype=torch.float64, device=device)
    d = _decisions(5, "random", seed=4, columns=8).double().to(device)
    with torch.no_grad():
        expected = _dense_chain([_dense_copy(m) for m in modules], x, d)
        torch.testing.assert_close(run_blocks(modules, x, d, backend=backend), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    routed, _, cin = _make("basic_down", 8, dtype=dtype)
    x = torch.randn(5, cin, 6, 6, dtype=dtype)
    d = torch.tensor([1.0, 0, 1, 0, 0], dtype=dtype)
    weight = torch.randn_like(routed(x, d))
    got, expected = (_loss_and_grads(m, x, d, weight) for m in (routed, _dense_copy(routed)))
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for g, e in zip((*got[:3], *got[3]), (*expected[:3], *expected[3])):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_decision_gradient_is_the_output_difference():
    routed, _, cin = _make("bottleneck_down", 5)
    x = torch.randn(6, cin, 5, 5)
    d = torch.tensor([0.0, 1, 1, 0, 0, 1], requires_grad=True)
    weight = torch.randn(6, 16, 3, 3)
    (routed(x, d) * weight).sum().backward()
    with torch.no_grad():
        diff = routed.tuned(x) - routed.frozen(x)
    torch.testing.assert_close(d.grad, (weight * diff).sum((1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_channels_last():
    routed, _, cin = _make("bottleneck_down", 1)
    x = torch.randn(5, cin, 6, 6)
    d = torch.tensor([1.0, 0, 1, 1, 0])
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = routed(x_cl, d)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _dense_copy(routed)(x, d), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    x_ref = x.clone().requires_grad_(True)
    routed(x_ref, d).sum().backward()
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Execution: each image through its chosen copy only


def _record_batch_sizes(routed):
    seen = {"frozen": [], "tuned": []}
    for key in seen:
        getattr(routed, key).get_submodule(_first_conv(routed)).register_forward_pre_hook(
            lambda m, args, key=key: seen[key].append(args[0].shape[0]))
    return seen


def _first_conv(routed):
    return "conv1" if hasattr(routed.frozen, "conv1") else "conv.0.0"


def test_inference_runs_each_image_once():
    routed, _, cin = _make("bottleneck")
    seen = _record_batch_sizes(routed)
    x = torch.randn(7, cin, 5, 5)
    with torch.no_grad():
        routed(x, torch.tensor([1.0, 0, 0, 1, 0, 1, 0]))
    assert seen == {"frozen": [4], "tuned": [3]}


def test_one_route_inference_runs_the_copy_on_the_input_itself():
    routed, _, cin = _make("basic")
    inputs = []
    routed.tuned.conv1.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x = torch.randn(3, cin, 5, 5)
    with torch.no_grad():
        routed(x, torch.ones(3))
    assert inputs[0] is x


def test_other_copy_runs_only_for_the_decision_gradient():
    routed, _, cin = _make("basic_down")
    seen = _record_batch_sizes(routed)
    x = torch.randn(5, cin, 6, 6)
    d = torch.tensor([0.0, 1, 0, 0, 1])
    routed(x, d).sum().backward()  # decision without grad: chosen copies only
    assert seen == {"frozen": [3], "tuned": [2]}
    seen["frozen"].clear(), seen["tuned"].clear()
    out = routed(x, d.requires_grad_(True))
    assert seen == {"frozen": [3], "tuned": [2]}
    out.sum().backward()  # the backward runs the copies the images did not take, once each
    assert seen == {"frozen": [3, 2], "tuned": [2, 3]}


@pytest.mark.parametrize("frozen_bn,kind", [("eval", "zeros"), ("train", "zeros"), ("train", "ones")])
def test_copy_that_no_image_chose_gets_zero_gradients(frozen_bn, kind):
    routed, _, cin = _make("bottleneck_down", frozen_bn=frozen_bn)
    routed(torch.randn(4, cin, 5, 5), _decisions(4, kind)).sum().backward()
    idle = routed.tuned if kind == "zeros" else routed.frozen
    trainable = [p for p in idle.parameters() if p.requires_grad]
    assert trainable, "the idle copy has trainable parameters in this case"
    for p in trainable:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    busy = routed.frozen if kind == "zeros" else routed.tuned
    assert all(torch.count_nonzero(p.grad) > 0 for p in busy.parameters() if p.requires_grad)


def test_copies_do_not_alias():
    routed, _, _ = _make("bottleneck_down")
    frozen = {t.untyped_storage().data_ptr() for t in (*routed.frozen.parameters(), *routed.frozen.buffers())}
    tuned = {t.untyped_storage().data_ptr() for t in (*routed.tuned.parameters(), *routed.tuned.buffers())}
    assert frozen.isdisjoint(tuned)
    assert not any(p.requires_grad for p in routed.frozen.parameters())
    assert all(p.requires_grad for p in routed.tuned.parameters())
    before = routed.frozen.conv1.weight.clone()
    with torch.no_grad():
        routed.tuned.conv1.weight.add_(1.0)
    assert torch.equal(routed.frozen.conv1.weight, before)


# ---------------------------------------------------------------------------------------------
# BatchNorm in train mode


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_mode_bn_normalises_each_copy_over_its_sub_batch():
    routed, _, cin = _make("bottleneck_down", 2)
    routed.train()
    assert routed.tuned.training and not routed.frozen.training
    tuned_ref = copy.deepcopy(routed.tuned).train()
    frozen_ref = copy.deepcopy(routed.frozen).eval()
    frozen_state = _bn_state(routed.frozen)
    x = torch.randn(7, cin, 6, 6)
    d = torch.tensor([1.0, 0, 1, 1, 0, 0, 1], requires_grad=True)
    out = routed(x, d)
    chosen = d.detach().bool()
    torch.testing.assert_close(out[chosen], tuned_ref(x[chosen]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[~chosen], frozen_ref(x[~chosen]), rtol=1e-5, atol=1e-6)
    _assert_state_equal(_bn_state(routed.tuned), _bn_state(tuned_ref))  # stats from the tuned sub-batch
    _assert_state_equal(_bn_state(routed.frozen), frozen_state)  # truly frozen by default
    # The decision gradient's other-copy forward: same rule (batch statistics of the frozen-routed
    # sub-batch in the tuned copy), no running-statistics update.
    weight = torch.randn_like(out)
    tuned_state = _bn_state(routed.tuned)
    (out * weight).sum().backward()
    _assert_state_equal(_bn_state(routed.tuned), tuned_state)
    with torch.no_grad():
        other_frozen_rows = copy.deepcopy(tuned_ref).train()(x[~chosen])
        other_tuned_rows = frozen_ref(x[chosen])
    expected = torch.empty(7)
    expected[chosen] = (weight[chosen] * (out[chosen] - other_tuned_rows)).sum((1, 2, 3)).detach()
    expected[~chosen] = -(weight[~chosen] * (out[~chosen] - other_frozen_rows)).sum((1, 2, 3)).detach()
    torch.testing.assert_close(d.grad, expected, rtol=1e-4, atol=1e-5)


def test_frozen_bn_train_trains_the_frozen_copy_bn():
    routed, _, cin = _make("basic_down", 3, frozen_bn="train")
    assert routed.frozen_bn == "train"
    for name, p in routed.frozen.named_parameters():
        assert p.requires_grad == ("bn" in name or "downsample.1" in name), name
    routed.train()
    assert routed.frozen.training
    frozen_ref = copy.deepcopy(routed.frozen).train()
    before = _bn_state(routed.frozen)
    x = torch.randn(6, cin, 6, 6)
    d = torch.tensor([1.0, 0, 0, 1, 0, 1])
    out = routed(x, d)
    chosen = d.bool()
    torch.testing.assert_close(out[~chosen], frozen_ref(x[~chosen]), rtol=1e-5, atol=1e-6)
    after = _bn_state(routed.frozen)
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    _assert_state_equal(after, _bn_state(frozen_ref))  # statistics of the frozen sub-batch
    out.sum().backward()
    assert routed.frozen.bn1.weight.grad is not None and routed.frozen.conv1.weight.grad is None


def test_train_mode_dense_uses_the_whole_batch():
    routed, _, cin = _make("basic", 4)
    dense = _dense_copy(routed).train()
    tuned_ref = copy.deepcopy(routed.tuned).train()
    x = torch.randn(5, cin, 4, 4)
    d = torch.tensor([1.0, 0, 1, 0, 0])
    out = dense(x, d)
    torch.testing.assert_close(out[d.bool()], tuned_ref(x)[d.bool()], rtol=1e-5, atol=1e-6)
    _assert_state_equal(_bn_state(dense.tuned), _bn_state(tuned_ref))


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
@pytest.mark.parametrize("d", [[0.0, 1, 1], [1.0, 0, 0], [0.0, 0, 0], [1.0, 1, 1]])
def test_tiny_sub_batch_uses_running_statistics(frozen_bn, d):
    # Bottleneck with stride 2 at 2x2: its conv2/conv3/downsample BatchNorms see 1x1 maps.
    routed, _, cin = _make("bottleneck_down", 5, frozen_bn=frozen_bn)
    routed.train()
    d = torch.tensor(d, requires_grad=True)
    x = torch.randn(3, cin, 2, 2)
    states = {k: _bn_state(getattr(routed, k)) for k in ("frozen", "tuned")}
    refs = {k: copy.deepcopy(getattr(routed, k)) for k in ("frozen", "tuned")}
    out = routed(x, d)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(d.grad).all()
    for key, rows in (("tuned", d.detach().bool()), ("frozen", ~d.detach().bool())):
        n = int(rows.sum())
        if n == 1 and getattr(routed, key).training:  # one image at 1x1: eval statistics for those layers
            ref = refs[key].train()
            for m in (ref.bn2, ref.bn3, ref.downsample[1]):
                m.eval()
            torch.testing.assert_close(out[rows], ref(x[rows]), rtol=1e-5, atol=1e-6)
            for name in ("bn2", "bn3", "downsample.1"):
                assert torch.equal(_bn_state(getattr(routed, key))[f"{name}.running_mean"],
                                   states[key][f"{name}.running_mean"])
        for k, v in _bn_state(getattr(routed, key)).items():
            assert torch.isfinite(v.float()).all(), (key, k)
        if n == 0:  # an empty sub-batch leaves the statistics alone
            _assert_state_equal(_bn_state(getattr(routed, key)), states[key])


# ---------------------------------------------------------------------------------------------
# Whole backbones


def _wrap(blocks, cls, **kwargs):
    return [cls(b, **kwargs) for b in blocks]


def _resnet18_blocks(seed):
    torch.manual_seed(seed)
    net = resnet18(num_classes=10)
    _randomize_bn(net)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu)
    blocks = _wrap([b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer], RoutedBasicBlock)
    return stem.eval(), blocks


def _bottleneck_blocks(seed):
    torch.manual_seed(seed)
    net = ResNet(Bottleneck, [1, 2, 1, 1], width_per_group=16, num_classes=10)
    _randomize_bn(net)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu)
    blocks = _wrap([b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer], RoutedBottleneck)
    return stem.eval(), blocks


def _mobilenet_blocks(seed):
    torch.manual_seed(seed)
    net = mobilenet_v2(width_mult=0.25)
    _randomize_bn(net)
    # The first 8 layers: blocks with and without a residual, strides 1 and 2, the stem in front.
    modules = [RoutedInvertedResidual(m) if isinstance(m, InvertedResidual) else m for m in net.features[:8]]
    return nn.Identity(), modules


def _dense_chain(modules, x, decisions):
    column = 0
    for m in modules:
        if isinstance(m, routed_module.RoutedBlock):
            x = m(x, decisions[:, column])
            column += 1
        else:
            x = m(x)
    return x


CHAIN_CASES = [(f, b, k) for f in (_resnet18_blocks, _bottleneck_blocks)
               for b, k in ((5, "random"), (1, "random"), (3, "zeros"), (3, "ones"), (4, "mixed"))]
CHAIN_CASES += [(_mobilenet_blocks, 5, "random"), (_mobilenet_blocks, 2, "ones")]  # float64 depthwise convs are slow


@pytest.mark.parametrize("factory,batch,kind", CHAIN_CASES)
def test_run_blocks_matches_dense_chain(factory, batch, kind):
    stem, modules = factory(0)  # float64: the comparison is exact up to float64 rounding
    stem.double()
    for m in modules:
        m.double().eval()
        if isinstance(m, routed_module.RoutedBlock):
            _perturb(m.tuned, 0.05)
    dense_modules = copy.deepcopy(modules)
    for m in dense_modules:
        if isinstance(m, routed_module.RoutedBlock):
            m.execution = "dense"
    n_routed = sum(isinstance(m, routed_module.RoutedBlock) for m in modules)
    x = stem(torch.randn(batch, 3, 16, 16, dtype=torch.float64)).detach()
    d = _decisions(batch, kind, seed=batch, columns=n_routed).double()
    with torch.no_grad():
        expected = _dense_chain(dense_modules, x, d)
        torch.testing.assert_close(run_blocks(modules, x, d), expected, rtol=1e-10, atol=1e-10)
        # run_blocks with dense blocks is the dense chain too
        torch.testing.assert_close(run_blocks(dense_modules, x, d), expected, rtol=1e-10, atol=1e-10)

    results = []
    for mods, fn in ((modules, run_blocks), (dense_modules, _dense_chain)):
        xg, dg = x.clone().requires_grad_(True), d.clone().requires_grad_(True)
        out = fn(mods, xg, dg)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * weight).sum().backward()
        tuned = [p.grad for m in mods if isinstance(m, routed_module.RoutedBlock) for p in m.tuned.parameters()]
        results.append((out, xg.grad, dg.grad, tuned))
    (out, gx, gd, gt), (e_out, e_gx, e_gd, e_gt) = results
    torch.testing.assert_close(out, e_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, e_gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gd, e_gd, rtol=1e-10, atol=1e-10)
    for g, e in zip(gt, e_gt):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _count_calls(monkeypatch, *names):
    """Counts the calls routed.py makes to these functions, in a dict updated as they happen."""
    calls = dict.fromkeys(names, 0)

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in names:
        monkeypatch.setattr(routed_module, name, counting(name, getattr(routed_module, name)))
    return calls


def test_run_blocks_plans_once_and_gathers_once(monkeypatch):
    _, modules = _resnet18_blocks(1)
    for m in modules:
        m.eval()
    calls = _count_calls(monkeypatch, "route_plan", "gather_rows")
    modules.insert(3, nn.Identity())  # a non-routed module between routed blocks
    x = torch.randn(4, 64, 4, 4)
    d = _decisions(4, "random", columns=8).requires_grad_(True)
    run_blocks(modules, x, d).sum().backward()
    assert calls == {"route_plan": 1, "gather_rows": 1}


def test_run_blocks_one_route_inference_runs_the_blocks_as_torchvision(monkeypatch):
    _, modules = _resnet18_blocks(4)
    for m in modules:
        m.eval()
        _perturb(m.tuned, 0.05)
    calls = _count_calls(monkeypatch, "gather_rows", "combine_rows")
    x = torch.randn(3, 64, 8, 8)
    d = torch.tensor([[1.0, 0, 0, 1, 1, 1, 0, 1]]).expand(3, -1)  # one route per block, both copies used
    with torch.no_grad():
        out = run_blocks(modules, x, d)
    # every block's rows stay in batch order: no gather, no combine, and the copies' own results
    assert calls == {"gather_rows": 0, "combine_rows": 0}
    expected = x
    for m, column in zip(modules, d[0]):
        expected = (m.tuned if column else m.frozen)(expected)
    assert torch.equal(out, expected)
    # a random block in the middle: the uniform blocks beside it combine into its order
    d = d.clone()
    d[:, 4] = torch.tensor([1.0, 0, 1])
    with torch.no_grad():
        out = run_blocks(modules, x, d)
    assert calls == {"gather_rows": 0, "combine_rows": 2}  # blocks 3 (into block 4's order) and 4
    torch.testing.assert_close(out, _dense_chain(modules, x, d), rtol=1e-5, atol=1e-5)


def test_run_blocks_with_non_routed_modules_between():
    _, modules = _resnet18_blocks(2)
    plain = BasicBlock(64, 64).eval()
    _randomize_bn(plain)
    modules = [m.eval() for m in modules]
    chain = modules[:1] + [plain] + modules[1:]
    x = torch.randn(5, 64, 8, 8)
    d = _decisions(5, "random", seed=3, columns=8)
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(chain, x, d), _dense_chain(chain, x, d), rtol=1e-4, atol=1e-5)
        # no routed block: the modules run as they are
        assert torch.equal(run_blocks([plain], x, d[:, :0]), plain(x))


# ---------------------------------------------------------------------------------------------
# Errors


def test_input_errors():
    routed, _, cin = _make("basic")
    x = torch.randn(3, cin, 4, 4)
    with pytest.raises(ValueError, match=r"decision of shape \[B\]"):
        routed(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"decision of shape \[B\] with B = 3"):
        routed(x, torch.zeros(4))
    with pytest.raises(TypeError, match="floating"):
        routed(x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="device"):
        routed(x, torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="0 or 1"):
        routed(x, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"x of shape \[B, C, H, W\]"):
        routed(x[0], torch.zeros(3))
    with pytest.raises(TypeError, match="decision as a tensor"):
        routed(x, [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="execution must be one of"):
        routed.execution = "masked"


def test_run_blocks_errors():
    _, modules = _resnet18_blocks(0)
    x = torch.randn(2, 64, 4, 4)
    with pytest.raises(ValueError, match=r"decisions of shape \[B, L\] = \[B, 8\]"):
        run_blocks(modules, x, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="with B = 2"):
        run_blocks(modules, x, torch.zeros(3, 8))
    with pytest.raises(TypeError, match="floating"):
        run_blocks(modules, x, torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 or 1"):
        run_blocks(modules, x, torch.full((2, 8), 2.0))
    with pytest.raises(ValueError, match="device"):
        run_blocks(modules, x, torch.zeros(2, 8, device="meta"))


def test_construction_errors():
    with pytest.raises(TypeError, match="Bottleneck"):
        RoutedBottleneck(BasicBlock(4, 4))
    with pytest.raises(TypeError, match="BasicBlock"):
        RoutedBasicBlock(Bottleneck(16, 4))
    with pytest.raises(TypeError, match="InvertedResidual"):
        RoutedInvertedResidual(BasicBlock(4, 4))
    with pytest.raises(ValueError, match="frozen_bn must be one of"):
        RoutedBasicBlock(BasicBlock(4, 4), frozen_bn="frozen")
    with pytest.raises(ValueError, match="execution must be one of"):
        RoutedBasicBlock(BasicBlock(4, 4), execution="masked")
    with pytest.raises(ValueError, match="track running statistics"):
        RoutedBasicBlock(BasicBlock(4, 4, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)))

    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match="nn.Sequential"):
        RoutedBasicBlock(BasicBlock(4, 4, downsample=Shortcut()))


def test_exports():
    assert spottune_ext.RoutedBottleneck is RoutedBottleneck
    assert spottune_ext.run_blocks is run_blocks
