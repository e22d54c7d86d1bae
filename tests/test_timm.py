"""timm ResNet-family backbones: routed timm blocks are exact, convert() takes timm models, and
spottune_<arch> is in timm's registry. Skipped only where timm is not installed."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

if importlib.util.find_spec("timm") is None:  # skipped only where timm is absent, never when it fails to import
    pytest.skip("timm is not installed", allow_module_level=True)
import timm  # noqa: E402
from timm.layers import BatchNormAct2d, BlurPool2d  # noqa: E402
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

import spottune_ext as st  # noqa: E402
from spottune_ext.models.timm_models import (RoutedTimmBasicBlock, RoutedTimmBottleneck,  # noqa: E402
                                             RoutedTimmDepthwiseSeparable, RoutedTimmInvertedResidual)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(block=BasicBlock, layers=(2, 1, 1, 1), **kwargs):
    return ResNet(block, layers, num_classes=5, channels=(8, 16, 32, 64), stem_width=8, **kwargs)


def mobilenet(**kwargs):
    return timm.create_model("mobilenetv2_050", num_classes=5, **kwargs)


# name: (model factory, block path); every shortcut kind and every per-image extra a timm block has
VARIANTS = {
    "basic": (tiny, "layer1.1"),
    "basic_down": (tiny, "layer2.0"),
    "basic_se_blur": (lambda: tiny(block_args={"attn_layer": "se"}, aa_layer=BlurPool2d), "layer2.0"),
    "bottleneck": (lambda: tiny(Bottleneck), "layer1.1"),
    "bottleneck_down_avg": (lambda: tiny(Bottleneck, avg_down=True, stem_type="deep"), "layer2.0"),
    "bottleneck_eca_aa": (lambda: tiny(Bottleneck, block_args={"attn_layer": "eca"}, aa_layer=nn.AvgPool2d),
                          "layer3.0"),
    "bottleneck_drop_path": (lambda: tiny(Bottleneck, drop_path_rate=0.2, drop_block_rate=0.1), "layer4.0"),
    "depthwise_separable": (mobilenet, "blocks.0.0"),
    "inverted_residual_down": (mobilenet, "blocks.1.0"),
    "inverted_residual": (lambda: mobilenet(drop_path_rate=0.2), "blocks.1.1"),
    "inverted_residual_se_silu": (lambda: timm.create_model("efficientnet_b0", num_classes=5), "blocks.2.1"),
}
ROUTED = {BasicBlock: RoutedTimmBasicBlock, Bottleneck: RoutedTimmBottleneck, InvertedResidual: RoutedTimmInvertedResidual,
          DepthwiseSeparableConv: RoutedTimmDepthwiseSeparable}


def _randomize(module, scale=0.2):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, scale)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, scale)
                m.bias.normal_(0, scale)
    return module


def _block(name, dtype=torch.float32):
    torch.manual_seed(0)
    factory, path = VARIANTS[name]
    block = _randomize(factory().get_submodule(path)).to(dtype).eval()
    original = copy.deepcopy(block)
    routed = ROUTED[type(block)](block)
    with torch.no_grad():
        for p in routed.tuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return routed.eval(), original


def _input(block, batch, dtype=torch.float32):
    conv = next(m for m in block.frozen.modules() if isinstance(m, nn.Conv2d))
    return torch.randn(batch, conv.in_channels, 8, 8, dtype=dtype)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("grad", [False, True])
def test_one_route_is_the_timm_block_bit_for_bit(name, grad):
    routed, original = _block(name)
    x = _input(routed, 5)
    with torch.set_grad_enabled(grad):
        assert torch.equal(routed(x, torch.zeros(5)), original(x))
        assert torch.equal(routed(x, torch.ones(5)), routed.tuned(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_each_image_gets_its_chosen_copy(name):
    routed, original = _block(name)
    x = _input(routed, 7)
    d = torch.tensor([0.0, 1, 1, 0, 1, 0, 0])
    expected = torch.where(d.view(-1, 1, 1, 1).bool(), routed.tuned(x), original(x))
    with torch.no_grad():
        torch.testing.assert_close(routed(x, d), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed(x, d), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["basic_down", "depthwise_separable", "inverted_residual_down"])
def test_train_mode_batchnorm_over_the_sub_batch(name):
    routed, _ = _block(name)
    routed.train()
    tuned = copy.deepcopy(routed.tuned).train()  # the fine-tuned copy run by itself on the whole batch
    x = _input(routed, 6)
    torch.testing.assert_close(routed(x, torch.ones(6)), tuned(x))
    for a, b in zip(routed.tuned.buffers(), tuned.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_match_dense(name):
    routed, _ = _block(name, torch.float64)
    dense = copy.deepcopy(routed)
    dense.execution = "dense"
    x = _input(routed, 6, torch.float64)
    d = torch.tensor([1.0, 0, 1, 1, 0, 0], dtype=torch.float64)
    weight = torch.randn_like(routed(x, d))
    grads = []
    for module in (routed, dense):
        xi, di = x.clone().requires_grad_(), d.clone().requires_grad_()
        (module(xi, di) * weight).sum().backward()
        grads.append([xi.grad, di.grad] + [p.grad for p in module.tuned.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,blocks", [("resnet", 5), ("mobilenet", 17)])
def test_converted_timm_model(name, blocks):
    torch.manual_seed(0)
    if name == "resnet":
        backbone = tiny(Bottleneck, drop_rate=0.2, drop_path_rate=0.1, block_args={"attn_layer": "se"})
    else:
        backbone = mobilenet(drop_rate=0.2, drop_path_rate=0.1)
    backbone = _randomize(backbone).eval()
    net = st.convert(backbone, policy={"widths": (8, 16), "stem_width": 8})
    assert net.num_routed == blocks
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, torch.zeros(3, blocks)), backbone(x))
        tuned = st.export_global(net.train(), [x], threshold=0.0)  # every block's fine-tuned copy
        torch.testing.assert_close(net.eval()(x, torch.ones(3, blocks)), tuned.eval()(x))
    net.train()  # drop-path, head dropout and the policy's sampling in a training step
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.policy.parameters())


def test_unsupported_timm_blocks_say_why():
    with pytest.raises(TypeError, match="act2 is a SiLU, not ReLU"):
        st.convert(tiny(act_layer=nn.SiLU))
    with pytest.raises(TypeError, match="bn1 is a SyncBatchNorm"):
        st.convert(tiny(norm_layer=nn.SyncBatchNorm))
    with pytest.raises(TypeError, match="downsample.1 is a BatchNormAct2d"):
        st.convert(tiny(norm_layer=BatchNormAct2d))
    with pytest.raises(TypeError, match="ConvBnAct; convert.. routes timm EfficientNets"):
        st.convert(timm.create_model("efficientnetv2_rw_t"))
    with pytest.raises(TypeError, match="supported models: .*timm EfficientNet"):
        st.convert(timm.create_model("vit_tiny_patch16_224"))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_050"])
def test_timm_registry_and_checkpoint(tmp_path, arch):
    assert {"spottune_resnet50", "spottune_mobilenetv2_100"} <= set(timm.list_models("spottune_*"))
    net = timm.create_model(f"spottune_{arch}", num_classes=3, drop_path_rate=0.1, strategy="l2sp", alpha=0.5)
    assert net.strategy.alpha == 0.5 and net.pretrained_cfg["architecture"] == arch
    assert 0 < max(m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath") <= 0.1  # timm ramps it
    st.save_checkpoint(net, tmp_path / "net.pt")
    loaded, _ = st.load_checkpoint(tmp_path / "net.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net.eval()(x))


def test_launcher_defaults_reach_timm_names():
    st.models.registry.set_defaults(strategy="global_k", k=1)
    try:
        net = timm.create_model("spottune_resnet18", num_classes=3, lambda2=0.5)
    finally:
        st.models.registry.set_defaults()
    assert net.strategy.options() == {"k": 1, "lambda1": 1.0, "lambda2": 0.5}
