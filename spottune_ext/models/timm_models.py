"""timm ResNet-family backbones for convert(), and ``spottune_<arch>`` entries in timm's model registry.

Imported by spottune_ext when timm is installed (pip install timm, or the `timm` extra). convert() then
takes a timm ``ResNet`` built from timm's ``BasicBlock`` / ``Bottleneck``: resnet*/resnext*/
wide_resnet* and their variants with deep or tiered stems and average-pool shortcuts (resnet50d,
resnet26t, ...), drop-path and DropBlock, squeeze-excitation and other attention modules (seresnet*,
ecaresnet*, ...) and anti-aliasing (BlurPool) layers: everything a block computes besides its
BatchNorm layers acts on each image on its own, so routing whole blocks per image is well-defined.
What is not: BatchNorm inside an attention or anti-aliasing module, BatchNorm layers with a fused
activation (timm's BatchNormAct2d), a final activation other than ReLU. timm's MobileNetV2 (EfficientNet
class, BatchNormAct2d layers) is not supported.

    import timm, spottune_ext
    model = timm.create_model("spottune_resnet50", num_classes=10, drop_path_rate=0.05, strategy="global_k", k=3)
    model = spottune_ext.convert(timm.create_model("seresnet50", num_classes=10))

The spottune_<arch> entries build timm's <arch> with every timm argument (pretrained weights from
pretrained_cfg_overlay=dict(file=...) or checkpoint_path, as timm loads them) and pass the other
keyword arguments to convert().
"""
import inspect
from typing import Any

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .. import routed
from . import families, registry
from .convert import convert
from .strategies import STRATEGIES

_BatchNorm = nn.modules.batchnorm._BatchNorm
_PER_IMAGE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.Identity)  # no statistics across the batch


def _norm(layer: nn.Module, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    return routed._norm(layer, x, update_stats) if isinstance(layer, _BatchNorm) else layer(x)


def _check_timm_block(name: str, block: nn.Module, expected: type, norms: tuple, final_act: str) -> None:
    if type(block) is not expected:
        raise TypeError(f"{name} expects a timm {expected.__name__}, got {type(block).__name__}")
    problems = []
    for path in norms:
        layer = getattr(block, path)
        if not (type(layer) is nn.BatchNorm2d or isinstance(layer, _PER_IMAGE_NORMS)):
            problems.append(f"{path} is a {type(layer).__name__} (supported: BatchNorm2d, GroupNorm, LayerNorm)")
    for path, module in block.named_modules():
        if isinstance(module, _BatchNorm) and type(module) is not nn.BatchNorm2d:
            problems.append(f"{path} is a {type(module).__name__} (BatchNorm with a fused activation)")
    for part in ("se", "aa", "drop_block", "drop_path"):
        module = getattr(block, part, None)
        if isinstance(module, nn.Module) and any(isinstance(m, _BatchNorm) for m in module.modules()):
            problems.append(f"{part} ({type(module).__name__}) holds BatchNorm layers")
    if type(getattr(block, final_act)) is not nn.ReLU:
        problems.append(f"the final activation {final_act} is a {type(getattr(block, final_act)).__name__}, not ReLU")
    if problems:
        raise TypeError(f"{name} cannot route this block: {'; '.join(problems)}")


def _tail(copy: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Attention and drop-path of the main branch, as timm's blocks apply them before the shortcut."""
    if copy.se is not None:
        # some attention modules cannot take an empty sub-batch; their parameters still get a (zero) gradient
        out = copy.se(out) if out.shape[0] else out + sum(p.sum() * 0 for p in copy.se.parameters())
    if copy.drop_path is not None:
        out = copy.drop_path(out)
    return out


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


class TimmResNetFamily(families.Family):
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
        head_dropout = [nn.Dropout(float(model.drop_rate)).train(model.training)] if model.drop_rate else []
        return [model.conv1, model.bn1, model.act1, model.maxpool, *stages, model.global_pool, *head_dropout, model.fc]

    def classifier(self, model):
        return model.fc

    def replace_classifier(self, model, num_classes):
        model.reset_classifier(num_classes)

    def describe(self, model):
        # timm.create_model rebuilds it from its name and arguments; families.describe() checks that it does
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture")
        if architecture is None:
            raise TypeError("a timm ResNet not made by timm.create_model cannot be described for a checkpoint")
        kwargs = {**getattr(model, "_model_args", {}), "num_classes": model.num_classes}
        return {"family": self.name, "architecture": architecture, "kwargs": kwargs}

    def build(self, d):
        return timm.create_model(d["architecture"], **d["kwargs"])


families.register_family(TimmResNetFamily(), "timm ResNet made of timm's BasicBlock/Bottleneck (resnet*, resnext*, "
                                             "wide_resnet*, seresnet*, ecaresnet*, their d/t/s variants, with "
                                             "drop-path, DropBlock, attention and anti-aliasing)")

# convert()'s own keyword arguments and every strategy's options; the rest goes to timm.create_model
_CONVERT_ARGS = ({p for p in inspect.signature(convert).parameters if p not in ("model", "num_classes",
                                                                               "strategy_options")}
                 | {p for cls in STRATEGIES.values() for p in inspect.signature(cls).parameters})
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18d", "resnet26d", "resnet50d",
         "resnet101d", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
         "seresnet50", "ecaresnet50d")


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
