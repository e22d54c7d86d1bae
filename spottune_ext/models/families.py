"""The backbone families convert() understands: where their blocks are, how their forward runs as one
flat sequence of modules, which module is the classifier, and how to rebuild them from a description.

  resnet      torchvision ResNet built from BasicBlock / Bottleneck (resnet18/34/50/101/152,
              wide_resnet50_2/101_2, resnext50_32x4d/101_32x8d/101_64x4d)
  mobilenet_v2  torchvision MobileNetV2 (its InvertedResidual blocks)
  resnet26    spottune_ext DecathlonResNet / resnet26 (BasicBlocks with a parameter-free shortcut)
"""
from typing import Dict, List, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models import MobileNetV2, ResNet
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from .. import routed
from .resnet26 import DecathlonResNet

SUPPORTED = ("torchvision ResNet made of BasicBlock/Bottleneck blocks (resnet18/34/50/101/152, wide_resnet50_2/101_2, "
             "resnext50_32x4d/101_32x8d/101_64x4d), torchvision MobileNetV2 (InvertedResidual blocks), "
             "spottune_ext resnet26 / DecathlonResNet (BasicBlock with a parameter-free ZeroPadShortcut)")

_FLATTEN = nn.Flatten(1)
_GLOBAL_POOL = nn.AdaptiveAvgPool2d(1)


class Family:
    """How one kind of backbone is taken apart. Blocks are named by their path in the backbone."""

    name = ""
    model_class: type = nn.Module
    # The policy network convert() builds: "sized" (the default) costs a few per cent of the backbone's
    # compute (bench/RESULTS.md), reading the image at half resolution as BlockDrop's policy does;
    # "paper" is the paper's (64/128/256/512 channels for ResNet-50, reading the full image). A dict of
    # PolicyNet arguments given to convert() takes its widths from "paper".
    policy_widths, policy_stem_width, policy_input_scale = (32, 64), 32, 0.5
    paper_policy_widths = (64, 128, 256, 512)
    archs: Tuple[str, ...] = ()  # the constructors (torchvision.models.get_model names) of this family

    def policy_defaults(self, size: str = "sized") -> dict:
        """PolicyNet arguments of this family's "sized" (default) or "paper" policy network."""
        if size == "sized":
            return {"widths": self.policy_widths, "stem_width": self.policy_stem_width,
                    "input_scale": self.policy_input_scale}
        if size == "paper":
            return {"widths": self.paper_policy_widths, "stem_width": 32, "input_scale": None}
        raise ValueError(f"policy size must be 'sized' or 'paper', got {size!r}")

    def arch_of(self, model: nn.Module) -> str:
        """The constructor name of `model`, or the family's name when none matches."""
        return self.archs[0] if len(self.archs) == 1 else self.name

    def total_stride(self, model: nn.Module) -> int:
        """How much the backbone downsamples its input before the global pooling."""
        return 32

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """Every residual block that can be routed, in forward order."""
        raise NotImplementedError

    def routed_class(self, block: nn.Module) -> type:
        raise NotImplementedError

    def sequence(self, model: nn.Module) -> List[nn.Module]:
        """The backbone's forward as a list of modules run one after the other (blocks included)."""
        raise NotImplementedError

    def classifier(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def replace_classifier(self, model: nn.Module, num_classes: int) -> None:
        raise NotImplementedError

    def describe(self, model: nn.Module) -> Dict:
        """Constructor arguments that rebuild the backbone (describe() checks that they do)."""
        raise NotImplementedError

    def build(self, description: Dict) -> nn.Module:
        raise NotImplementedError

    def check_forward(self, model: nn.Module, *methods: str) -> None:
        for method in methods:
            if getattr(type(model), method) is not getattr(self.model_class, method):
                raise TypeError(f"{type(model).__name__} overrides {self.model_class.__name__}.{method}; convert() "
                                f"runs the {self.model_class.__name__} forward and cannot follow a custom one")


def _check_block(name: str, block: nn.Module, allowed: Tuple[type, ...]) -> None:
    if type(block) not in allowed:
        raise TypeError(f"block {name} is a {type(block).__name__}; convert() routes only {SUPPORTED}")


class ResNetFamily(Family):
    name = "resnet"
    model_class = ResNet
    _BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
    archs = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
             "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")

    def arch_of(self, model):
        # The ResNets differ only in depth and widths: compare parameter shapes with each (on meta, no memory).
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        for arch in self.archs:
            with torch.device("meta"):
                candidate = torchvision.models.get_model(arch, num_classes=model.fc.out_features)
            if {k: v.shape for k, v in candidate.state_dict().items()} == shapes:
                return arch
        return self.name

    def blocks(self, model):
        self.check_forward(model, "forward", "_forward_impl")
        out = []
        for i in range(1, 5):
            for j, block in enumerate(getattr(model, f"layer{i}")):
                _check_block(f"layer{i}.{j}", block, (BasicBlock, Bottleneck))
                out.append((f"layer{i}.{j}", block))
        return out

    def routed_class(self, block):
        return routed.RoutedBottleneck if isinstance(block, Bottleneck) else routed.RoutedBasicBlock

    def sequence(self, model):
        stages = [block for i in range(1, 5) for block in getattr(model, f"layer{i}")]
        return [model.conv1, model.bn1, model.relu, model.maxpool, *stages, model.avgpool, _FLATTEN, model.fc]

    def classifier(self, model):
        return model.fc

    def replace_classifier(self, model, num_classes):
        model.fc = nn.Linear(model.fc.in_features, num_classes)

    def describe(self, model):
        blocks = [b for _, b in self.blocks(model)]
        kinds = {type(b).__name__ for b in blocks}
        if len(kinds) != 1:
            raise TypeError(f"a ResNet mixing block types {sorted(kinds)} cannot be described for a checkpoint")
        return {"family": self.name, "block": kinds.pop(), "layers": [len(getattr(model, f"layer{i}")) for i in range(1, 5)],
                "num_classes": model.fc.out_features, "groups": model.groups, "width_per_group": model.base_width,
                # stages 2-4 start with stride 2 unless built with dilation instead
                "replace_stride_with_dilation": [getattr(model, f"layer{i}")[0].stride == 1 for i in range(2, 5)]}

    def build(self, d):
        return ResNet(self._BLOCKS[d["block"]], d["layers"], num_classes=d["num_classes"], groups=d["groups"],
                      width_per_group=d["width_per_group"],
                      replace_stride_with_dilation=d["replace_stride_with_dilation"])


class MobileNetV2Family(Family):
    name = "mobilenet_v2"
    model_class = MobileNetV2
    archs = ("mobilenet_v2",)
    # Even the ResNets' sized policy would cost 0.37x a MobileNetV2's compute; this one 0.10x. The paper
    # has no MobileNetV2: its ResNet-50 policy would cost 9x one (2.8 vs 0.3 GMACs at 224x224), 32/64/128 1.9x.
    policy_widths, policy_stem_width = (16, 32), 16
    paper_policy_widths = (32, 64, 128)

    def blocks(self, model):
        self.check_forward(model, "forward", "_forward_impl")
        out = []
        for i, module in enumerate(model.features):
            if isinstance(module, InvertedResidual):
                _check_block(f"features.{i}", module, (InvertedResidual,))
                out.append((f"features.{i}", module))
        return out

    def routed_class(self, block):
        return routed.RoutedInvertedResidual

    def sequence(self, model):
        return [*model.features, _GLOBAL_POOL, _FLATTEN, model.classifier]

    def classifier(self, model):
        return model.classifier

    def replace_classifier(self, model, num_classes):
        linear = model.classifier[-1]
        model.classifier[-1] = nn.Linear(linear.in_features, num_classes)

    def describe(self, model):
        blocks = [b for _, b in self.blocks(model)]
        stem = model.features[0][0].out_channels
        last = model.features[-1][0].out_channels
        # torchvision scales the stem (32), the last layer (1280) and every stage by width_mult, then rounds
        # to multiples of 8; stage widths are stored unscaled so that the rounding gives them back.
        width_mult = next((w for w in (1.0, last / 1280, stem / 32)
                           if _make_divisible(32 * w) == stem and _make_divisible(1280 * max(1.0, w)) == last), None)
        if width_mult is None:
            raise TypeError(f"this MobileNetV2 (stem {stem}, last layer {last} channels) matches no width_mult and "
                            f"cannot be described for a checkpoint")
        setting = []
        for block in blocks:
            inp = block.conv[0][0].in_channels
            hidden = block.conv[0][0].out_channels if len(block.conv) == 4 else inp
            t, c, s = hidden / inp, block.out_channels / width_mult, block.stride
            if setting and setting[-1][0] == t and setting[-1][1] == c and s == 1:
                setting[-1][2] += 1
            else:
                setting.append([t, c, 1, s])
        setting = [[int(t) if float(t).is_integer() else t, c, n, s] for t, c, n, s in setting]
        return {"family": self.name, "num_classes": model.classifier[-1].out_features, "width_mult": width_mult,
                "inverted_residual_setting": setting, "dropout": model.classifier[0].p}

    def build(self, d):
        return MobileNetV2(num_classes=d["num_classes"], width_mult=d["width_mult"],
                           inverted_residual_setting=d["inverted_residual_setting"], dropout=d["dropout"])


class ResNet26Family(Family):
    name = "resnet26"
    model_class = DecathlonResNet
    paper_policy_widths = (64, 128, 256)
    archs = ("resnet26",)

    def total_stride(self, model):
        return 2 ** len(model.layers)

    def blocks(self, model):
        self.check_forward(model, "forward")
        out = []
        for i, stage in enumerate(model.stages()):
            for j, block in enumerate(stage):
                _check_block(f"layer{i + 1}.{j}", block, (BasicBlock,))
                out.append((f"layer{i + 1}.{j}", block))
        return out

    def routed_class(self, block):
        return routed.RoutedBasicBlock

    def sequence(self, model):
        stages = [block for stage in model.stages() for block in stage]
        return [model.conv1, model.bn1, *stages, model.bn2, model.relu, model.avgpool, _FLATTEN, model.fc]

    def classifier(self, model):
        return model.fc

    def replace_classifier(self, model, num_classes):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        model.num_classes = num_classes

    def describe(self, model):
        return {"family": self.name, **model.config()}

    def build(self, d):
        return DecathlonResNet(d["num_classes"], d["layers"], d["widths"], d["stem_width"])


FAMILIES = {f.name: f for f in (ResNetFamily(), MobileNetV2Family(), ResNet26Family())}
ARCHS = tuple(arch for family in FAMILIES.values() for arch in family.archs)


def _make_divisible(v: float, divisor: int = 8) -> int:
    # torchvision's channel rounding for MobileNetV2
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def register_family(family: Family, description: str) -> None:
    """Adds a family to those convert() understands (e.g. from an optional package); description joins
    the list of supported models in error messages."""
    global SUPPORTED
    FAMILIES[family.name] = family
    SUPPORTED = f"{SUPPORTED}, {description}"


def family_of(model: nn.Module) -> Family:
    """The family of a backbone, or a TypeError naming what is supported."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"convert() does not support {type(model).__name__}; supported models: {SUPPORTED}")


def describe(model: nn.Module) -> Dict:
    """A JSON-like description of a plain backbone that build() turns back into the same architecture."""
    family = family_of(model)
    description = family.describe(model)
    with torch.device("meta"):
        rebuilt = family.build(description)
    # The same layers with the same settings (repr) and the same state-dict entries and shapes.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if got != expected or repr(rebuilt) != repr(model):
        diff = sorted(set(got.items()) ^ set(expected.items()))[:6] or "layer settings"
        raise TypeError(f"this {type(model).__name__} cannot be described for a checkpoint (a rebuilt one differs: "
                        f"{diff}); modified layers are not supported")
    return description


def build(description: Dict) -> nn.Module:
    if description.get("family") not in FAMILIES:
        raise ValueError(f"unknown backbone family {description.get('family')!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[description["family"]].build(description)


def match_classifier(model: nn.Module, state_dict: Dict) -> None:
    """Gives `model` a classifier of the size `state_dict` holds, so that the state dict loads (convert()
    replaces it by the target task's); a ValueError if the classifier's input size differs."""
    family = family_of(model)
    head = family.classifier(model)
    head = head[-1] if isinstance(head, nn.Sequential) else head
    name = next(n for n, m in model.named_modules() if m is head)
    weight = state_dict.get(f"{name}.weight")
    if weight is not None and weight.ndim == 2 and weight.shape != head.weight.shape:
        if weight.shape[1] != head.weight.shape[1]:
            raise ValueError(f"the classifier takes {weight.shape[1]} features, this {family.arch_of(model)}'s "
                             f"{head.weight.shape[1]}: another architecture")
        family.replace_classifier(model, weight.shape[0])
