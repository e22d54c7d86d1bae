"""spottune_ext: SpotTune adaptive fine-tuning with route-grouped execution.

Importing the package loads the compiled kernels (spottune_ext._C) and registers every op. The top
level holds what a model author uses; data sets (spottune_ext.data), pre-trained weights
(spottune_ext.models.weights), Visual Decathlon scores (spottune_ext.metrics), the models and losses
(spottune_ext.models) and the trainer (spottune_ext.train) live in their subpackages.
"""
from . import _ext  # noqa: F401  (must come first: loads the compiled ops)
from ._ext import build_info
from . import backends
from .models import (STRATEGIES, CheckpointError, PolicyNet, SpotTuneModel, Strategy, convert, export_global,
                     get_strategy, load_checkpoint, save_checkpoint)
from .ops import RoutePlan, combine_rows, gather_rows, gumbel_st, route_plan
from .routed import RoutedBasicBlock, RoutedBottleneck, RoutedInvertedResidual, run_blocks

__all__ = ["backends", "gumbel_st", "route_plan", "RoutePlan", "gather_rows", "combine_rows",
           "RoutedBasicBlock", "RoutedBottleneck", "RoutedInvertedResidual", "run_blocks",
           "convert", "export_global", "SpotTuneModel", "PolicyNet", "STRATEGIES", "Strategy", "get_strategy",
           "save_checkpoint", "load_checkpoint", "CheckpointError", "build_info"]
