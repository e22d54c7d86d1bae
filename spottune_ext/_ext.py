"""Loads the compiled extension and checks it matches the running torch (the extension records what
it was built against)."""
from typing import Dict

import torch

_HINT = "rebuild it with `python setup.py build_ext --inplace` (or `make setup`) in the source tree"

try:
    from . import _C  # registers the spottune_ext ops
except ImportError as err:
    raise ImportError(f"spottune_ext: the compiled extension spottune_ext._C could not be loaded ({err}); {_HINT}") from err

if not hasattr(_C, "TORCH_VERSION"):
    raise ImportError(f"spottune_ext: the compiled extension predates this source tree (it records no build facts); "
                      f"{_HINT}")
if _C.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"spottune_ext: the extension was built against torch {_C.TORCH_VERSION} but torch "
        f"{torch.__version__} is running; {_HINT}")
WITH_CUDA = bool(_C.WITH_CUDA)
if WITH_CUDA and _C.CUDA_VERSION != torch.version.cuda:
    raise ImportError(
        f"spottune_ext: the extension's CUDA kernels were built for CUDA {_C.CUDA_VERSION} but torch "
        f"uses CUDA {torch.version.cuda}; {_HINT}")


def build_info() -> Dict:
    """What the compiled extension was built against: {"torch": version, "cuda": version or None,
    "with_cuda": whether its CUDA kernels are in}."""
    return {"torch": _C.TORCH_VERSION, "cuda": _C.CUDA_VERSION or None, "with_cuda": WITH_CUDA}
