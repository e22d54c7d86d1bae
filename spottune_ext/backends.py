"""Which implementation runs each op: the one place where backends are chosen.

Backends:
  "torch"  : the pure-torch reference (spottune_ext.reference), any device;
  "cpp"    : the compiled C++ kernels, CPU tensors;
  "cuda"   : the compiled CUDA kernels, CUDA tensors (needs a CUDA build of the extension);
  "triton" : the Triton kernels, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1);
  "auto"   : the fastest measured implementation for the tensor's device (see AUTO).

Every op in spottune_ext/ops/ registers its implementations here (register) and runs the one
implementation() returns; the Triton ones are loaded on first use, so the package imports and
runs without triton installed.
"""
import os
import threading
from typing import Callable, Dict

import torch

from . import _ext

BACKENDS = ("torch", "cpp", "cuda", "triton")

# Fastest measured backend per op and device type (bench/RESULTS.md). An op whose custom
# kernel has not been measured faster than plain torch on a device keeps "torch" there.
# The "cuda" entries are not measured yet (no GPU run so far: bench/gpu_check.py measures them);
# the CPU entries are (bench/bench_gumbel_st.py, bench/bench_route_ops.py).
AUTO = {
    "gumbel_st": {"cpu": "cpp", "cuda": "cuda"},
    "route_plan": {"cpu": "cpp", "cuda": "cuda"},
    "gather_rows": {"cpu": "cpp", "cuda": "cuda"},
    "combine_rows": {"cpu": "cpp", "cuda": "cuda"},
}

default_backend = "auto"


def check_name(backend, where: str) -> str:
    """A backend name ("auto" or one of BACKENDS), checked where it is set rather than at the first call."""
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
    return backend


def triton_available(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Returns the concrete backend that runs `op` on `device`, or raises a clear error."""
    if backend == "auto":
        backend = default_backend
    if backend == "auto":
        # The choice is checked like an explicit one: a build without CUDA kernels gets the
        # rebuild message on CUDA tensors, not a dispatcher error.
        backend = AUTO.get(op, {}).get(device.type, "torch")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpp' runs on CPU tensors, got a tensor on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' runs on CUDA tensors, got a tensor on {device}")
        if not _ext.WITH_CUDA:
            raise RuntimeError(f"{op}: spottune_ext was built without CUDA kernels; rebuild with FORCE_CUDA=1")
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"{op}: backend 'triton' needs triton and a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
            f"got a tensor on {device}")
    return backend


_IMPLEMENTATIONS: Dict[str, Dict[str, Callable]] = {}
_LOADERS: Dict[str, Dict[str, Callable[[], Callable]]] = {}
_LOADING = threading.RLock()  # a loader defines ops: once, even with threads (re-entrant: loaders nest)


def register(op: str, implementations: Dict[str, Callable], loaders: Dict[str, Callable[[], Callable]]) -> None:
    """Declares `op`'s implementations: backend -> callable taking the op's schema arguments, and
    backend -> loader, a function called once on first use that returns the callable."""
    _IMPLEMENTATIONS[op] = dict(implementations)
    _LOADERS[op] = dict(loaders)


def kernel(op: str, backend: str) -> Callable:
    """The implementation of `op` by the concrete `backend` (no device check: see implementation())."""
    if op not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_IMPLEMENTATIONS)}")
    impls = _IMPLEMENTATIONS[op]
    if backend not in impls:
        if backend not in _LOADERS[op]:
            raise ValueError(f"{op}: no implementation for backend {backend!r}")
        with _LOADING:
            if backend not in impls:
                impls[backend] = _LOADERS[op][backend]()
    return impls[backend]


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` that `backend` ("auto" or a name of BACKENDS) runs on `device`."""
    return kernel(op, resolve(op, backend, device))
