"""spottune_ext: SpotTune adaptive fine-tuning with route-grouped execution.

Importing the package loads the compiled kernels (spottune_ext._C) and registers every op.
"""
from . import _ext  # noqa: F401  (must come first: loads the compiled ops)
from . import backends, reference
from .ops import RoutePlan, combine_rows, gather_rows, gumbel_st, route_plan
from .routed import RoutedBasicBlock, RoutedBottleneck, RoutedInvertedResidual, run_blocks
from .data import DATASETS, build_datasets
from .metrics import decathlon_score

__all__ = ["backends", "reference", "gumbel_st", "route_plan", "RoutePlan", "gather_rows", "combine_rows",
           "RoutedBasicBlock", "RoutedBottleneck", "RoutedInvertedResidual", "run_blocks",
           "DATASETS", "build_datasets", "decathlon_score"]
