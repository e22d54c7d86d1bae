"""spottune_ext: SpotTune adaptive fine-tuning with route-grouped execution.

Importing the package loads the compiled kernels (spottune_ext._C) and registers every op.
"""
from . import _ext  # noqa: F401  (must come first: loads the compiled ops)
from ._ext import build_info
from . import backends, reference
from .ops import RoutePlan, combine_rows, gather_rows, gumbel_st, route_plan
from .routed import RoutedBasicBlock, RoutedBottleneck, RoutedInvertedResidual, run_blocks
from .data import DATASETS, build_datasets
from .metrics import decathlon_score
from .models import (MOBILENET_V2_OFFLINE, STRATEGIES, DecathlonResNet, PolicyNet, SpotTuneModel, Strategy, convert,
                     entropy_loss, export_global, get_strategy, global_k_loss, global_k_objective, load_checkpoint,
                     load_weights, mobilenet_v2_offline_file, parameter_counts, read_weights, resnet26,
                     save_checkpoint, usage_fraction, weights_file)
from .data import DATASETS, build_datasets
from .metrics import decathlon_score

__all__ = ["backends", "reference", "gumbel_st", "route_plan", "RoutePlan", "gather_rows", "combine_rows",
           "RoutedBasicBlock", "RoutedBottleneck", "RoutedInvertedResidual", "run_blocks",
           "DATASETS", "build_datasets", "decathlon_score",
           "convert", "export_global", "SpotTuneModel", "parameter_counts", "resnet26", "DecathlonResNet", "PolicyNet",
           "usage_fraction", "global_k_loss", "entropy_loss", "global_k_objective", "STRATEGIES", "Strategy",
           "get_strategy", "save_checkpoint", "load_checkpoint", "load_weights", "read_weights", "weights_file",
           "mobilenet_v2_offline_file", "MOBILENET_V2_OFFLINE",
           "DATASETS", "build_datasets", "decathlon_score", "build_info"]
