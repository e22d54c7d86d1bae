"""Routed blocks and converted models under torch.autocast: forward and backward run, and the
gradients agree with those of the same float32 model within the low-precision dtype's tolerance."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

import spottune_ext as st
from spottune_ext.models.resnet26 import DecathlonResNet, ZeroPadShortcut



def _cpu_autocast_supports(dtype):
    with torch.autocast("cpu", dtype=dtype):  # an unsupported dtype warns and leaves autocast disabled
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype


# CPU autocast in bfloat16, and in float16 where this torch supports it on the CPU.
DTYPES = [d for d in (torch.bfloat16, torch.float16) if _cpu_autocast_supports(d)]
# Autocast rounds every layer's output: gradients differ from float32 ones by a few percent in
# bfloat16 (8-bit mantissa), less in float16 (11 bits); in train mode BatchNorm's batch statistics
# over a handful of images amplify the rounding. The plain tiny backbone's own errors (the "finetune"
# strategy, no routed block) are 0.14 (bf16) and 0.04 (fp16) in train mode, 0.07 and 0.002 in eval
# mode; these bounds leave about 2x to the worst strategy measured.
LOGITS_TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}
GRAD_TOLERANCE = {"train": {torch.bfloat16: 0.3, torch.float16: 0.1},
                  "eval": {torch.bfloat16: 0.2, torch.float16: 0.05}}
LOSS_SCALE = 2.0 ** 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _down(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# (routed class, block factory, input channels): every block family and shortcut kind.
BLOCKS = {
    "basic": (st.RoutedBasicBlock, lambda: BasicBlock(8, 8), 8),
    "basic_down": (st.RoutedBasicBlock, lambda: BasicBlock(8, 12, 2, _down(8, 12, 2)), 8),
    "bottleneck": (st.RoutedBottleneck, lambda: Bottleneck(16, 4), 16),
    "bottleneck_down": (st.RoutedBottleneck, lambda: Bottleneck(8, 4, 2, _down(8, 16, 2)), 8),
    "inverted_res": (st.RoutedInvertedResidual, lambda: InvertedResidual(8, 8, 1, 3), 8),
    "inverted_nores": (st.RoutedInvertedResidual, lambda: InvertedResidual(8, 12, 2, 6), 8),
    "resnet26": (st.RoutedBasicBlock, lambda: BasicBlock(8, 16, 2, ZeroPadShortcut(8, 16)), 8),
}


def _error(got, expected, what):
    """Relative error norm of got (autocast) against expected (float32)."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values under autocast"
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def _make_block(name):
    torch.manual_seed(0)
    cls, factory, cin = BLOCKS[name]
    block = factory()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    routed = cls(block)
    with torch.no_grad():  # a tuned copy far enough from the frozen one that F^(x) - F(x) is not all rounding
        for p in routed.tuned.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    return routed.eval(), cin


def _masked(routed):
    """The plain-torch yardstick: torchvision's blocks mixed by the mask, y = I * F^(x) + (1 - I) * F(x)."""
    return lambda x, d: (d.view(-1, 1, 1, 1) * routed.tuned(x) + (1 - d.view(-1, 1, 1, 1)) * routed.frozen(x))


def _block_step(module, params, x, d, weight, dtype):
    x, d = x.clone().requires_grad_(True), d.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(x, d)
    (out.float() * weight).sum().backward()
    return {"output": out, "input gradient": x.grad, "decision gradient": d.grad,
            **{f"tuned {n} gradient": p.grad for n, p in params}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("execution", ["grouped", "dense"])
@pytest.mark.parametrize("name", BLOCKS)
def test_block_under_autocast(name, execution, dtype):
    """Values and gradients (input, decision, tuned weights) as close to float32 as those of
    torchvision's own blocks under the same autocast (BatchNorm in eval mode)."""
    routed, cin = _make_block(name)
    routed.execution = execution
    x = torch.randn(6, cin, 8, 8)
    d = torch.tensor([0.0, 1, 1, 0, 1, 0])
    weight = torch.randn_like(routed(x, d))
    errors = {}
    for label, make in (("routed", lambda m: m), ("torchvision", _masked)):
        expected, got = (_block_step(make(m), list(m.tuned.named_parameters()), x, d, weight, dt)
                         for m, dt in ((copy.deepcopy(routed), None), (copy.deepcopy(routed), dtype)))
        if label == "routed":
            assert got["output"].dtype == dtype  # the block computed in low precision
            assert got["input gradient"].dtype == got["decision gradient"].dtype == torch.float32
        errors[label] = {k: _error(got[k], expected[k], f"{label} {k}") for k in expected}
    for k, err in errors["routed"].items():
        bound = 2 * errors["torchvision"][k] + LOGITS_TOLERANCE[dtype] / 5
        assert err <= bound, f"{k}: relative error {err:.3g} under {dtype}, torchvision's {errors['torchvision'][k]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_run_blocks_under_autocast(dtype):
    """A chain of routed blocks of both kinds of shortcut, planned once (run_blocks), in train mode."""
    torch.manual_seed(1)
    modules = [st.RoutedBasicBlock(BasicBlock(8, 16, 2, ZeroPadShortcut(8, 16))),
               st.RoutedBasicBlock(BasicBlock(16, 16))]
    x = torch.randn(8, 8, 8, 8)
    d = torch.tensor([[0.0, 1], [1, 1], [1, 0], [0, 0], [0, 1], [1, 1], [0, 0], [1, 0]])
    results = []
    for amp in (None, dtype):
        xs, ds = x.clone().requires_grad_(True), d.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = st.run_blocks(copy.deepcopy(modules), xs, ds)
        out.float().square().sum().backward()
        results.append((out, xs.grad, ds.grad))
    assert results[1][0].dtype == dtype
    for what, g, e in zip(("output", "input gradient", "decision gradient"), results[1], results[0]):
        assert _error(g, e, what) <= GRAD_TOLERANCE["train"][dtype], what


def _tiny_resnet26():
    return DecathlonResNet(5, (2, 2, 1), (8, 16, 16), 8)


STRATEGY_OPTIONS = {"finetune_last_k": {"k": 2}, "random_policy": {"last": 2}}


def _convert(strategy, execution):
    torch.manual_seed(0)
    kwargs = dict(STRATEGY_OPTIONS.get(strategy, {}))
    if st.STRATEGIES[strategy].uses_policy:
        kwargs["policy"] = {"widths": (8, 16), "stem_width": 8}
    return st.convert(_tiny_resnet26(), strategy=strategy, execution=execution, **kwargs).train()


def _model_step(model, x, y, dtype, seed=3):
    torch.manual_seed(seed)  # the same Gumbel noise / random routes in both runs
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
        loss = F.cross_entropy(logits, y) + model.extra_loss()
    # A constant loss scale, as GradScaler applies, keeps float16 gradients from underflowing
    # (a power of two: exact in every dtype).
    (loss * LOSS_SCALE).backward()
    decisions = None if model.last_policy is None else model.last_policy.detach().float()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]) / LOSS_SCALE
    return logits, decisions, grads


def _model_errors(model, dtype, size=16, seed=3):
    """(logits error, gradient error) of one step under autocast against float32, same routes."""
    x, y = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(5)), torch.arange(6) % 5
    expected = _model_step(copy.deepcopy(model), x, y, None, seed)
    got = _model_step(copy.deepcopy(model), x, y, dtype, seed)
    assert got[0].dtype == dtype
    if expected[1] is not None and expected[1].numel():
        # A prerequisite of the comparison: a route flipped by rounding would make another model.
        assert torch.equal(got[1], expected[1]), "the routes differ between the float32 and the autocast run"
    assert got[2].shape == expected[2].shape  # the same parameters got gradients
    return _error(got[0], expected[0], "logits"), _error(got[2], expected[2], "parameter gradients")


def _running_statistics(model):
    """Eval mode, BatchNorm on non-trivial running statistics, the policy sampling as in training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    if model.policy is not None:
        model.policy.sample_in_eval = True
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("execution", ["grouped", "dense"])
@pytest.mark.parametrize("strategy", list(st.STRATEGIES))
def test_converted_model_under_autocast(strategy, execution, dtype):
    """Every strategy trains under autocast with no change to the model: logits and the gradients of
    every trainable parameter (policy included) close to float32, with the same routes, in train mode
    and with BatchNorm on its running statistics."""
    for mode, model in (("train", _convert(strategy, execution)), ("eval", _running_statistics(_convert(strategy, execution)))):
        logits_err, grad_err = _model_errors(model, dtype)
        assert logits_err <= LOGITS_TOLERANCE[dtype], f"{mode}: logits error {logits_err:.3g}"
        assert grad_err <= GRAD_TOLERANCE[mode][dtype], f"{mode}: gradient error {grad_err:.3g}"


@pytest.mark.parametrize("execution", ["grouped", "dense"])
def test_mobilenet_v2_under_autocast(execution):
    """MobileNetV2's inverted residuals, with and without a shortcut, in a converted model."""
    torch.manual_seed(0)
    model = st.convert(mobilenet_v2(num_classes=5, width_mult=0.25), policy={"widths": (8, 16), "stem_width": 8},
                       adaptive_blocks=range(4), execution=execution).train()
    logits_err, grad_err = _model_errors(model, torch.bfloat16, size=32, seed=0)
    assert logits_err <= LOGITS_TOLERANCE[torch.bfloat16] and grad_err <= GRAD_TOLERANCE["train"][torch.bfloat16]
