"""SpotTune models in torchvision's model registry: ``spottune_<arch>`` for every torchvision architecture
convert() supports, so that code that builds its model by name (torchvision.models.get_model, as
torchvision's classification reference script does) builds a converted one::

    import torchvision, spottune_ext
    model = torchvision.models.get_model("spottune_resnet50", weights="ResNet50_Weights.IMAGENET1K_V2",
                                         num_classes=200, strategy="global_k", k=3)
    torchvision.models.list_models(include="spottune_*")

Scripts that never import spottune_ext get the names from ``python -m spottune_ext.launch``, whose
options become the builders' defaults (set_defaults).
"""
from typing import Any, Callable, Dict, Optional

from torch import nn
from torchvision import models
from torchvision.models._api import BUILTIN_MODELS, register_model

from .convert import SpotTuneModel, convert
from .weights import Source, read_weights

# arch -> the state-dict key of its classifier's weight (its row count is the weights' class count)
ARCHS = {
    **{name: "fc.weight" for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                      "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
                                      "resnext101_32x8d", "resnext101_64x4d")},
    "mobilenet_v2": "classifier.1.weight",
}

_DEFAULTS: Dict[str, Any] = {}


def set_defaults(**options: Any) -> None:
    """Options every spottune_<arch> builder uses unless its caller passes them (strategy, its options,
    convert()'s options); replaces the previous defaults. The launcher sets them from its command line."""
    _DEFAULTS.clear()
    _DEFAULTS.update(options)


def defaults() -> Dict[str, Any]:
    """The options set_defaults() set."""
    return dict(_DEFAULTS)


def build(arch: str, *, weights: Optional[Source] = None, num_classes: Optional[int] = None,
          **options: Any) -> SpotTuneModel:
    """torchvision's `arch`, with `weights` loaded when given (a torchvision weights name or enum member, or a
    local state-dict file; nothing is downloaded), converted by convert(**options) with the builder defaults
    under them. num_classes replaces the classifier unless it equals the weights' (or, without weights,
    builds the backbone with that many classes)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; spottune builders exist for {sorted(ARCHS)}")
    options = {**_DEFAULTS, **options}
    if weights is None:
        backbone = models.get_model(arch, weights=None, num_classes=1000 if num_classes is None else num_classes)
        return convert(backbone, **options)
    state = read_weights(weights)
    if ARCHS[arch] not in state:
        raise ValueError(f"weights {weights!s} hold no {ARCHS[arch]!r}: not a {arch} state dict")
    classes = state[ARCHS[arch]].shape[0]
    backbone = models.get_model(arch, weights=None, num_classes=classes)
    backbone.load_state_dict(state)
    return convert(backbone, num_classes=None if num_classes in (None, classes) else num_classes, **options)


def _builder(arch: str) -> Callable[..., nn.Module]:
    def builder(*, weights: Optional[Source] = None, num_classes: Optional[int] = None, **options: Any) -> nn.Module:
        return build(arch, weights=weights, num_classes=num_classes, **options)

    builder.__name__ = builder.__qualname__ = f"spottune_{arch}"
    builder.__doc__ = (f"SpotTune {arch}: torchvision's {arch} converted by spottune_ext.convert.\n\n"
                       f"Args: weights (a torchvision weights name or a local file), num_classes, and convert()'s "
                       f"keyword arguments (strategy and its options, policy, adaptive_blocks, tau, ...).")
    return builder


for _arch in ARCHS:
    globals()[f"spottune_{_arch}"] = _builder(_arch)
    if f"spottune_{_arch}" not in BUILTIN_MODELS:  # a reloaded module must not register twice
        register_model(f"spottune_{_arch}")(globals()[f"spottune_{_arch}"])
