"""The whole model against an independent port of the authors' forward pass.

The authors' SpotTune runs both copies of every block on the whole batch and mixes them with the
policy's straight-through decisions, x = F(x) * (1 - I) + F^(x) * I, each copy computed by the plain
block's own forward; their frozen copy's BatchNorm layers train (batch statistics, trainable affine
parameters). The port below calls the torchvision / ResNet-26 block modules themselves, not the routed
blocks' code paths. One SGD step from the same state, with the same Gumbel noise, must give the same
parameter updates (float64, to 1e-5):
  - with the authors' BatchNorm handling (frozen_bn="train") and dense execution;
  - with every BatchNorm on its running statistics (bn_stats="running"), where grouped execution must
    match too, since no statistic depends on the route.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import spottune_ext as st
from spottune_ext.models.resnet26 import DecathlonResNet
from spottune_ext.routed import RoutedBlock


pytestmark = pytest.mark.usefixtures("one_thread")


def authors_forward(model, x, decisions):
    """The authors' masked forward, on the routed blocks' frozen and tuned torchvision modules."""
    column = 0
    for module in model.family.sequence(model.backbone):
        if isinstance(module, RoutedBlock):
            mask = decisions[:, column].view(-1, 1, 1, 1)
            x = module.frozen(x) * (1 - mask) + module.tuned(x) * mask
            column += 1
        else:
            x = module(x)
    return x


def sgd_step(model, forward, x, y, noise, lr=0.1):
    """Parameter updates (name -> new - old) of one SGD step on cross-entropy, decisions from `noise`."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decisions = model.policy(x, noise=noise)
    loss = F.cross_entropy(forward(model, x, decisions), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, decisions.detach()


def backbones():
    return {
        "resnet26": lambda: DecathlonResNet(10, (2, 2, 2), (8, 16, 32), 8),
        "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10),
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    }


def pretrained(builder):
    """A backbone with non-trivial BatchNorm statistics and affine parameters, as pre-training leaves them."""
    torch.manual_seed(0)
    net = builder()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("arch", sorted(backbones()))
@pytest.mark.parametrize("mode", ["authors_bn_dense", "running_stats_grouped", "running_stats_dense"])
def test_one_sgd_step_matches_the_authors_forward(arch, mode):
    options = {
        "authors_bn_dense": {"frozen_bn": "train", "execution": "dense"},
        "running_stats_grouped": {"bn_stats": "running", "execution": "grouped"},
        "running_stats_dense": {"bn_stats": "running", "execution": "dense"},
    }[mode]
    backbone = pretrained(backbones()[arch])
    model = st.convert(backbone, num_classes=10, policy={"widths": (8, 16), "stem_width": 8}, backend="torch",
                       **options).double().train()
    for m in model.modules():  # the port and the model must draw no other randomness
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # Fine-tuned copies as training leaves them: identical copies give every decision a zero gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".tuned." in name:
                p.add_(0.1 * p.std().nan_to_num() * torch.randn_like(p))
    port = copy.deepcopy(model)
    if mode == "authors_bn_dense":  # the authors' .train(): every BatchNorm layer in training mode
        for m in port.backbone.modules():
            m.train()
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    noise = torch.rand(6, model.num_routed)

    ours, decisions = sgd_step(model, lambda m, x, d: m(x, d), x, y, noise)
    theirs, port_decisions = sgd_step(port, authors_forward, x, y, noise)

    assert torch.equal(decisions, port_decisions)
    assert 0 < decisions.mean() < 1, "both routes must be taken for the comparison to mean anything"
    for name, update in theirs.items():
        torch.testing.assert_close(ours[name], update, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    moved = {n for n, update in theirs.items() if update.abs().max() > 1e-6}
    assert any(".tuned." in n for n in moved), "the step must change the fine-tuned copies"
    assert any(n.startswith("policy.") for n in moved), "the policy must get the decision gradient"
    for name, buffer in port.named_buffers():  # running statistics updated the same way
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, rtol=0, atol=1e-5)
