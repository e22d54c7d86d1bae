"""Loads the compiled extension and checks it matches the running torch."""
import torch

_HINT = "rebuild it with `python setup.py build_ext --inplace` (or `make setup`) in the source tree"

try:
    from . import _build_info
    from . import _C  # noqa: F401  (registers the spottune_ext ops)
except ImportError as err:
    raise ImportError(f"spottune_ext: the compiled extension spottune_ext._C could not be loaded ({err}); {_HINT}") from err

if _build_info.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"spottune_ext: the extension was built against torch {_build_info.TORCH_VERSION} but torch "
        f"{torch.__version__} is running; {_HINT}")
if _build_info.WITH_CUDA and _build_info.CUDA_VERSION != torch.version.cuda:
    raise ImportError(
        f"spottune_ext: the extension's CUDA kernels were built for CUDA {_build_info.CUDA_VERSION} but torch "
        f"uses CUDA {torch.version.cuda}; {_HINT}")

WITH_CUDA = _build_info.WITH_CUDA
