"""ResNet-50 with SpotTune's routed blocks: grouped vs dense masked execution vs a plain ResNet-50.

Setup (CPU): torchvision resnet50 with random weights, all 16 Bottlenecks wrapped in
RoutedBottleneck, stem and head included; batch 16 at 112x112; a fixed random 50 % routing
(decisions [16, 16]); every BatchNorm in eval mode. The routed network runs its blocks with
run_blocks (grouped) or block by block with the mask formula (dense, the authors' execution).

Groups (compare medians within a group):
  inference      : no_grad forward; grouped with the compiled row-op kernels (backend "cpp"), grouped
                   with the plain-torch row ops (backend "torch"), dense, and plain resnet50 (no
                   routing at all).
  train-step     : forward + cross-entropy + backward with exact gradients; the routed networks
                   train the tuned copies, stem and head, and the decisions require grad (so the
                   decision gradient, with its other-copy forward, is computed); standard
                   fine-tuning trains every parameter of plain resnet50. No optimizer step.
  train-memory   : peak tensor memory of one training step (after one warm-up step), in
                   extra_info["peak_mib"]: the profiler's record of every allocation and free made
                   through PyTorch's CPU allocator (torch.profiler, profile_memory=True), summed in
                   time order; the peak of that running sum, from the step's start (gradients
                   cleared before it), counts activations, gradients and temporaries, not the
                   weights (extra_info["weights_mib"]). Its timing is that of a profiled step.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

from _common import cpu_peak_bytes
from spottune_ext import RoutedBottleneck, run_blocks

BATCH, SIZE, SEED = 16, 112, 0


class RoutedResNet(nn.Module):
    """A torchvision ResNet whose blocks are routed; forward(x, decisions [B, 16])."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.ModuleList(RoutedBottleneck(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                                    for b in layer)
        self.avgpool, self.fc = net.avgpool, net.fc
        self.execution, self.backend = "grouped", "auto"

    def configure(self, execution: str, backend: str = "auto") -> "RoutedResNet":
        self.execution, self.backend = execution, backend
        for block in self.blocks:
            block.execution, block.backend = execution, backend
        return self

    def forward(self, x, decisions):
        x = self.stem(x)
        if self.execution == "grouped":
            x = run_blocks(self.blocks, x, decisions, backend=self.backend)
        else:
            for column, block in enumerate(self.blocks):
                x = block(x, decisions[:, column])
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(SEED)
    plain = resnet50().eval()
    routed = RoutedResNet(copy.deepcopy(plain)).eval()
    for module in (routed.stem, routed.fc):
        module.requires_grad_(True)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    decisions = (torch.rand(BATCH, len(routed.blocks), generator=g) < 0.5).float()
    labels = torch.randint(0, 1000, (BATCH,), generator=g)
    return plain, routed, x, decisions, labels


VARIANTS = {  # name: (network, execution, row-op backend)
    "grouped": ("routed", "grouped", "cpp"),
    "grouped_torch_rows": ("routed", "grouped", "torch"),
    "dense": ("routed", "dense", "cpp"),
    "plain_resnet50": ("plain", None, None),
}


# Targets of grouped execution (time or peak-memory ratios, marked by bench/report.py).
TARGETS = {
    "inference": [{"vs": "dense", "max_ratio": 0.55}, {"vs": "plain_resnet50", "max_ratio": 1.08},
                  {"vs": "grouped_torch_rows", "max_ratio": 1.0}],
    "train-step": [{"vs": "dense", "max_ratio": 0.62}, {"vs": "plain_resnet50", "max_ratio": 1.18}],
    "train-memory": [{"vs": "dense", "max_ratio": 0.65}],
}


def _describe(benchmark, group, variant):
    benchmark.extra_info.update(impl=variant, baseline="dense",
                                targets=TARGETS[group] if variant == "grouped" else [])


def _model(setup, variant, decisions=None):
    """(model, forward) for a variant; decisions replaces the routed network's default ones."""
    plain, routed, x, default_decisions, _ = setup
    network, execution, backend = VARIANTS[variant]
    if network == "plain":
        return plain, lambda: plain(x)
    routed.configure(execution, backend)
    decisions = default_decisions if decisions is None else decisions
    return routed, lambda: routed(x, decisions)


def _train_step(setup, variant):
    """(model, clear_grads, step): step = forward + loss + backward (the routed network's decisions
    require grad); clear_grads sets every gradient to None."""
    decisions = setup[3].clone().requires_grad_(True)
    model, forward = _model(setup, variant, decisions)
    grads_of = [p for p in model.parameters() if p.requires_grad] + [decisions]

    def clear_grads():
        for t in grads_of:
            t.grad = None

    def step():
        F.cross_entropy(forward(), setup[4]).backward()

    return model, clear_grads, step


@pytest.mark.benchmark(group="inference")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference(benchmark, setup, variant):
    _describe(benchmark, "inference", variant)
    _, forward = _model(setup, variant)
    with torch.no_grad():
        out = benchmark(forward)
    assert out.shape == (BATCH, 1000)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("variant", ["grouped", "dense", "plain_resnet50"])
def test_train_step(benchmark, setup, variant):
    _describe(benchmark, "train-step", variant)
    _, clear_grads, step = _train_step(setup, variant)

    def run():
        clear_grads()
        step()

    benchmark(run)


@pytest.mark.benchmark(group="train-memory")
@pytest.mark.parametrize("variant", ["grouped", "dense", "plain_resnet50"])
def test_train_step_peak_memory(benchmark, setup, variant):
    _describe(benchmark, "train-memory", variant)
    benchmark.extra_info["metric"] = "peak_mib"
    model, clear_grads, step = _train_step(setup, variant)
    clear_grads()
    step()  # warm-up: one-time allocations are not the step's

    def measure():
        clear_grads()
        return cpu_peak_bytes(step)

    peak = benchmark.pedantic(measure, rounds=1, iterations=1)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    benchmark.extra_info.update(peak_mib=round(peak / 2**20, 1), weights_mib=round(weights / 2**20, 1))
    assert peak > 0
