"""Models: convert a pre-trained backbone into SpotTune (or a baseline strategy), the Visual Decathlon
ResNet-26, the policy network, global-k losses, export to a plain network, weights and checkpoints."""
import importlib.util

from . import registry  # registers the spottune_<arch> builders with torchvision
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .convert import SpotTuneModel, convert, export_global, parameter_counts
from .global_k import entropy_loss, global_k_loss, global_k_objective, usage_fraction
from .policy import PolicyNet
from .resnet26 import DecathlonResNet, ZeroPadShortcut, resnet26
from .strategies import STRATEGIES, Strategy, get_strategy
from .weights import MOBILENET_V2_OFFLINE, load_weights, mobilenet_v2_offline_file, read_weights, weights_file

if importlib.util.find_spec("timm") is not None:  # timm is optional
    from . import timm_models  # noqa: F401  (timm ResNets for convert(); spottune_<arch> in timm's registry)

__all__ = [
    "convert", "export_global", "SpotTuneModel", "parameter_counts",
    "resnet26", "DecathlonResNet", "ZeroPadShortcut", "PolicyNet",
    "usage_fraction", "global_k_loss", "entropy_loss", "global_k_objective",
    "STRATEGIES", "Strategy", "get_strategy",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "load_weights", "read_weights", "weights_file", "mobilenet_v2_offline_file", "MOBILENET_V2_OFFLINE",
]
