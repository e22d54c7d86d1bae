"""timm backbones for convert(), and ``spottune_<arch>`` entries in timm's model registry.

Imported by spottune_ext when timm is installed (pip install timm, or the `timm` extra). convert() then
takes
  - a timm ``ResNet`` built from timm's ``BasicBlock`` / ``Bottleneck``: resnet*/resnext*/wide_resnet*
    and their variants with deep or tiered stems and average-pool shortcuts (resnet50d, resnet26t,
    ...), drop-path and DropBlock, squeeze-excitation and other attention modules (seresnet*,
    ecaresnet*, ...) and anti-aliasing (BlurPool) layers;
  - a timm ``EfficientNet`` built from ``InvertedResidual`` / ``DepthwiseSeparableConv`` blocks
    (mobilenetv2_*, efficientnet_*, mnasnet_*, ...), routed as torchvision's MobileNetV2 blocks are.
Everything a block computes besides its BatchNorm layers acts on each image on its own, so routing
whole blocks per image is well-defined; BatchNorm layers follow the routing rules of spottune_ext.routed,
timm's BatchNormAct2d too (its activation applied after). Refused, with the reason: BatchNorm inside an
attention or anti-aliasing module or a BatchNormAct2d in a shortcut, other BatchNorm classes, a ResNet
block's final activation other than ReLU, other block types.

    import timm, spottune_ext
    model = timm.create_model("spottune_resnet50", num_classes=10, drop_path_rate=0.05, strategy="global_k", k=3)
    model = spottune_ext.convert(timm.create_model("mobilenetv2_100", num_classes=10))

The spottune_<arch> entries build timm's <arch> with every timm argument (pretrained weights from
pretrained_cfg_overlay=dict(file=...) or checkpoint_path, as timm loads them) and pass the other
keyword arguments to convert().
"""
import inspect
from typing import Any

import timm
import torch
from timm.layers import BatchNormAct2d
from timm.models import register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .. import routed
from . import families, registry
from .convert import convert
from .strategies import STRATEGIES

_BatchNorm = nn.modules.batchnorm._BatchNorm
_PER_IMAGE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.Identity)  # no statistics across the batch


def _norm(layer: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    """A block's norm layer under the routing rules; a BatchNormAct2d's BatchNorm as nn.BatchNorm2d runs,
    then its dropout and activation."""
    if type(layer) is BatchNormAct2d:
        if not layer.training or update_stats and x.numel() > x.shape[1]:
            out = nn.BatchNorm2d.forward(layer, x)  # the layer as a plain BatchNorm (routed._norm calls it so)
        else:
            out = routed._norm(layer, x, update_stats)
        return layer.act(layer.drop(out))
    return routed._norm(layer, x, update_stats) if isinstance(layer, _BatchNorm) else layer(x)


def _check_timm_block(name: str, block: nn.Module, expected: type, norms: tuple, final_act=None) -> None:
    if type(block) is not expected:
        raise TypeError(f"{name} expects a timm {expected.__name__}, got {type(block).__name__}")
    problems = []
    norms = [path for path in norms if getattr(block, path, None) is not None]
    for path in norms:
        layer = getattr(block, path)
        if not (type(layer) in (nn.BatchNorm2d, BatchNormAct2d) or isinstance(layer, _PER_IMAGE_NORMS)):
            problems.append(f"{path} is a {type(layer).__name__} (supported: BatchNorm2d, BatchNormAct2d, GroupNorm, "
                            f"LayerNorm)")
    for path, module in block.named_modules():
        if isinstance(module, _BatchNorm) and type(module) is not nn.BatchNorm2d and path not in norms:
            problems.append(f"{path} is a {type(module).__name__} (only BatchNorm2d outside the main branch's norms)")
    for part in ("se", "aa", "drop_block", "drop_path"):
        module = getattr(block, part, None)
        if isinstance(module, nn.Module) and any(isinstance(m, _BatchNorm) for m in module.modules()):
            problems.append(f"{part} ({type(module).__name__}) holds BatchNorm layers")
    if final_act is not None and type(getattr(block, final_act)) is not nn.ReLU:
        problems.append(f"the final activation {final_act} is a {type(getattr(block, final_act)).__name__}, not ReLU")
    if problems:
        raise TypeError(f"{name} cannot route this block: {'; '.join(problems)}")


def _attention(copy: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if copy.se is None:
        return out
    # some attention modules cannot take an empty sub-batch; their parameters still get a (zero) gradient
    return copy.se(out) if out.shape[0] else out + sum(p.sum() * 0 for p in copy.se.parameters())


def _tail(copy: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Attention and drop-path of the main branch, as timm's ResNet blocks apply them before the shortcut."""
    out = _attention(copy, out)
    return out if copy.drop_path is None else copy.drop_path(out)


class RoutedTimmBasicBlock(routed.RoutedBlock):
    """Routed timm BasicBlock: conv-norm-DropBlock-act-anti-aliasing, conv-norm, attention, drop-path,
    shortcut (identity or downsample), ReLU."""

    final_relu = True

    def __init__(self, block: BasicBlock, **kwargs) -> None:
        _check_timm_block("RoutedTimmBasicBlock", block, BasicBlock, ("bn1", "bn2"), "act2")
        super().__init__(block, **kwargs)

    def main(self, copy: BasicBlock, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = copy.aa(copy.act1(copy.drop_block(_norm(copy.bn1, copy.conv1(x), update_stats))))
        return _tail(copy, _norm(copy.bn2, copy.conv2(out), update_stats))

    def shortcut(self, copy: BasicBlock):
        return routed.IDENTITY if copy.downsample is None else copy.downsample


class RoutedTimmBottleneck(routed.RoutedBlock):
    """Routed timm Bottleneck: 1x1 conv-norm-act, 3x3 conv-norm-DropBlock-act-anti-aliasing, 1x1
    conv-norm, attention, drop-path, shortcut (identity or downsample), ReLU."""

    final_relu = True

    def __init__(self, block: Bottleneck, **kwargs) -> None:
        _check_timm_block("RoutedTimmBottleneck", block, Bottleneck, ("bn1", "bn2", "bn3"), "act3")
        super().__init__(block, **kwargs)

    def main(self, copy: Bottleneck, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = copy.act1(_norm(copy.bn1, copy.conv1(x), update_stats))
        out = copy.aa(copy.act2(copy.drop_block(_norm(copy.bn2, copy.conv2(out), update_stats))))
        return _tail(copy, _norm(copy.bn3, copy.conv3(out), update_stats))

    def shortcut(self, copy: Bottleneck):
        return routed.IDENTITY if copy.downsample is None else copy.downsample


def _space_to_depth(copy: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    return x if copy.conv_s2d is None else _norm(copy.bn_s2d, copy.conv_s2d(x), update_stats)


class RoutedTimmInvertedResidual(routed.RoutedBlock):
    """Routed timm (EfficientNet-family) InvertedResidual: expand, depthwise, anti-aliasing, attention,
    project, drop-path; identity shortcut when the block has one (has_skip); no final activation."""

    def __init__(self, block: InvertedResidual, **kwargs) -> None:
        _check_timm_block("RoutedTimmInvertedResidual", block, InvertedResidual, ("bn_s2d", "bn1", "bn2", "bn3"))
        super().__init__(block, **kwargs)

    def main(self, copy: InvertedResidual, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = _norm(copy.bn1, copy.conv_pw(_space_to_depth(copy, x, update_stats)), update_stats)
        out = _attention(copy, copy.aa(_norm(copy.bn2, copy.conv_dw(out), update_stats)))
        out = _norm(copy.bn3, copy.conv_pwl(out), update_stats)
        return copy.drop_path(out) if copy.has_skip else out

    def shortcut(self, copy: InvertedResidual):
        return routed.IDENTITY if copy.has_skip else None


class RoutedTimmDepthwiseSeparable(routed.RoutedBlock):
    """Routed timm DepthwiseSeparableConv: depthwise, anti-aliasing, attention, pointwise, drop-path;
    identity shortcut when the block has one (has_skip); no final activation."""

    def __init__(self, block: DepthwiseSeparableConv, **kwargs) -> None:
        _check_timm_block("RoutedTimmDepthwiseSeparable", block, DepthwiseSeparableConv, ("bn_s2d", "bn1", "bn2"))
        super().__init__(block, **kwargs)

    def main(self, copy: DepthwiseSeparableConv, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
        out = _norm(copy.bn1, copy.conv_dw(_space_to_depth(copy, x, update_stats)), update_stats)
        out = _norm(copy.bn2, copy.conv_pw(_attention(copy, copy.aa(out))), update_stats)
        return copy.drop_path(out) if copy.has_skip else out

    def shortcut(self, copy: DepthwiseSeparableConv):
        return routed.IDENTITY if copy.has_skip else None


class _TimmFamily(families.Family):
    """What timm models share: a classifier reset by reset_classifier(), rebuilt by timm.create_model."""

    def replace_classifier(self, model, num_classes):
        model.reset_classifier(num_classes)

    def describe(self, model):
        # timm.create_model rebuilds it from its name and arguments; families.describe() checks that it does
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
        if architecture is None:
            raise TypeError(f"a timm {type(model).__name__} not made by timm.create_model cannot be described for "
                            f"a checkpoint")
        kwargs = {**getattr(model, "_model_args", {}), "num_classes": model.num_classes}
        return {"family": self.name, "architecture": architecture, "kwargs": kwargs}

    def build(self, d):
        return timm.create_model(d["architecture"], **d["kwargs"])

    @staticmethod
    def head_dropout(model):
        return [nn.Dropout(float(model.drop_rate)).train(model.training)] if model.drop_rate else []


class TimmResNetFamily(_TimmFamily):
    name = "timm_resnet"
    model_class = ResNet

    def blocks(self, model):
        self.check_forward(model, "forward", "forward_features", "forward_head")
        out = []
        for i in range(1, 5):
            for j, block in enumerate(getattr(model, f"layer{i}")):
                if type(block) not in (BasicBlock, Bottleneck):
                    raise TypeError(f"block layer{i}.{j} is a {type(block).__name__}; convert() routes timm ResNets "
                                    f"made of timm's BasicBlock / Bottleneck only ({families.SUPPORTED})")
                out.append((f"layer{i}.{j}", block))
        return out

    def routed_class(self, block):
        return RoutedTimmBottleneck if isinstance(block, Bottleneck) else RoutedTimmBasicBlock

    def sequence(self, model):
        stages = [block for i in range(1, 5) for block in getattr(model, f"layer{i}")]
        return [model.conv1, model.bn1, model.act1, model.maxpool, *stages, model.global_pool,
                *self.head_dropout(model), model.fc]

    def classifier(self, model):
        return model.fc


class TimmEfficientNetFamily(_TimmFamily):
    name = "timm_efficientnet"
    model_class = EfficientNet
    policy_widths, policy_stem_width, paper_policy_widths = (16, 32), 16, (32, 64, 128)  # as torchvision's MobileNetV2

    def blocks(self, model):
        self.check_forward(model, "forward", "forward_features", "forward_head")
        out = []
        for i, stage in enumerate(model.blocks):
            for j, block in enumerate(stage):
                if type(block) not in (InvertedResidual, DepthwiseSeparableConv):
                    raise TypeError(f"block blocks.{i}.{j} is a {type(block).__name__}; convert() routes timm "
                                    f"EfficientNets made of InvertedResidual / DepthwiseSeparableConv only")
                out.append((f"blocks.{i}.{j}", block))
        return out

    def routed_class(self, block):
        return RoutedTimmInvertedResidual if isinstance(block, InvertedResidual) else RoutedTimmDepthwiseSeparable

    def sequence(self, model):
        blocks = [block for stage in model.blocks for block in stage]
        return [model.conv_stem, model.bn1, *blocks, model.conv_head, model.bn2, model.global_pool,
                *self.head_dropout(model), model.classifier]

    def classifier(self, model):
        return model.classifier


families.register_family(TimmResNetFamily(), "timm ResNet made of timm's BasicBlock/Bottleneck (resnet*, resnext*, "
                                             "wide_resnet*, seresnet*, ecaresnet*, their d/t/s variants, with "
                                             "drop-path, DropBlock, attention and anti-aliasing)")
families.register_family(TimmEfficientNetFamily(), "timm EfficientNet made of InvertedResidual/DepthwiseSeparableConv "
                                                   "blocks (mobilenetv2_*, efficientnet_*, mnasnet_*)")

# convert()'s own keyword arguments and every strategy's options; the rest goes to timm.create_model
_CONVERT_ARGS = ({p for p in inspect.signature(convert).parameters if p not in ("model", "num_classes",
                                                                               "strategy_options")}
                 | {p for cls in STRATEGIES.values() for p in inspect.signature(cls).parameters})
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18d", "resnet26d", "resnet50d",
         "resnet101d", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
         "seresnet50", "ecaresnet50d", "mobilenetv2_050", "mobilenetv2_100", "mobilenetv2_140", "efficientnet_b0")


def _entrypoint(arch: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        options = {**registry.defaults(), **{k: v for k, v in kwargs.items() if k in _CONVERT_ARGS}}
        backbone = timm.create_model(arch, pretrained=pretrained,
                                     **{k: v for k, v in kwargs.items() if k not in _CONVERT_ARGS})
        model = convert(backbone, **options)
        model.pretrained_cfg = model.default_cfg = backbone.pretrained_cfg  # timm's data config reads it
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = f"spottune_{arch}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"SpotTune {arch}: timm's {arch} converted by spottune_ext.convert."
    return entrypoint


for _arch in ARCHS:
    globals()[f"spottune_{_arch}"] = register_model(_entrypoint(_arch))
