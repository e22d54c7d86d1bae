"""Checkpoints: the state dict plus the configuration that rebuilds the model, written atomically.

save_checkpoint(model, path) takes a SpotTuneModel (from convert) or a plain supported backbone (e.g. what
export_global returns); load_checkpoint(path) rebuilds it (random init, then the saved state, strictly),
or loads into a given model after checking it has the same configuration.

A checkpoint is a torch.save file of {format, version, config, state_dict, extra, sha256}; sha256 is a
digest of config, state_dict and extra (every tensor's dtype, shape and bytes), checked on load. Files
are read with torch.load(weights_only=True) only, and every malformed file raises CheckpointError.
"""
import contextlib
import hashlib
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from ..io import atomic_write
from . import families
from .convert import SpotTuneModel, convert
from .policy import PolicyNet

FORMAT = "spottune_ext.checkpoint"
VERSION = 2  # 2: adds the sha256 digest; version-1 files (no digest) still load


class CheckpointError(ValueError):
    """A file that is not a valid, intact spottune_ext checkpoint (empty, truncated, corrupted, wrong keys,
    a configuration that does not build or does not match its state dict, non-finite weights)."""


def model_config(model: nn.Module) -> Dict:
    """The configuration a checkpoint stores for `model` (TypeError if it cannot be rebuilt from one)."""
    if isinstance(model, SpotTuneModel):
        return {"kind": "spottune", **model.config()}
    return {"kind": "backbone", "backbone": families.describe(model)}


def build_model(config: Dict) -> nn.Module:
    """A freshly initialised model of the configuration model_config() returned."""
    if config.get("kind") == "backbone":
        return families.build(config["backbone"])
    if config.get("kind") != "spottune":
        raise ValueError(f"unknown model kind {config.get('kind')!r} in checkpoint configuration")
    strategy = dict(config["strategy"])
    policy = config["policy"]
    return convert(families.build(config["backbone"]), adaptive_blocks=config["adaptive_blocks"],
                   strategy=strategy.pop("name"), policy=None if policy is None else PolicyNet(**policy),
                   execution=config["execution"], backend=config["backend"], frozen_bn=config["frozen_bn"],
                   bn_stats=config.get("bn_stats", "batch"), **strategy)


def save_checkpoint(model: nn.Module, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes {configuration, state dict, extra, digest} to `path` atomically (temporary file + os.replace).

    extra: anything else to keep (epoch, optimizer.state_dict(), ...), made of tensors, numbers,
    strings, lists and dicts so that it loads with torch.load(weights_only=True).
    """
    payload = {"format": FORMAT, "version": VERSION, "config": model_config(model), "state_dict": model.state_dict(),
               "extra": extra or {}}
    payload["sha256"] = _digest(payload)
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str, model: Optional[nn.Module] = None,
                    map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Returns (model, extra). Without `model`, rebuilds the saved model; with one, loads into it after
    checking its configuration equals the saved one (a ValueError names both otherwise).

    Raises CheckpointError (a ValueError) for any file that is not an intact checkpoint: empty or
    truncated, a digest that does not match (corruption), missing or mistyped entries, a configuration
    that does not build the saved state dict (checked on the meta device, so an absurd configuration
    allocates nothing), or a NaN/Inf weight. FileNotFoundError if there is no file.
    """
    payload = _read(path, map_location)
    config = payload["config"]
    if model is None:
        _check_config_builds(path, config, payload["state_dict"])
        model = build_model(config)
    else:
        own = model_config(model)
        if _architecture(own) != _architecture(config):
            raise ValueError(f"{path} holds a different model: saved {_summary(config)}, given {_summary(own)}")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError, TypeError) as err:  # shapes, keys, or a module's extra state
        raise CheckpointError(f"{path}: its state dict does not fit the model: {err}") from None
    return model, payload["extra"]


def _read(path: str, map_location: Any) -> Dict:
    """The payload of a checkpoint file, its structure, digest and weights checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a spottune_ext checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or corrupted zip/pickle raises many kinds of error
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated or corrupted?): "
                              f"{type(err).__name__}: {str(err)[:300]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spottune_ext checkpoint (save one with spottune_ext.save_checkpoint)")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format version must be a positive int, got {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} is a checkpoint of format version {version}; this spottune_ext reads "
                              f"up to version {VERSION}")
    for key, kind in (("config", dict), ("state_dict", dict), ("extra", dict)):
        if not isinstance(payload.get(key), kind):
            got = type(payload[key]).__name__ if key in payload else "nothing"
            raise CheckpointError(f"{path}: entry {key!r} must be a {kind.__name__}, got {got}")
    if version >= 2:
        if payload.get("sha256") != _digest(payload):
            raise CheckpointError(f"{path} is corrupted: the digest of its contents does not match the stored sha256")
    for key, value in payload["state_dict"].items():
        if key.endswith("_extra_state"):  # a module's get_extra_state() (the policy's tau): its own checks
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state dict entry {key!r} must be a tensor, got {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: weight {key!r} holds NaN or Inf values")
    return payload


# Registrations a model may make per state-dict entry while it is built (a replaced classifier, a copy
# of each routed block...), plus a margin for modules without state.
_BUILD_BUDGET_PER_ENTRY, _BUILD_BUDGET_MIN = 4, 1000


@contextlib.contextmanager
def _registration_budget(limit: int):
    """Raises CheckpointError once more than `limit` modules, parameters and buffers are registered."""
    count = [0]

    def hook(*_):
        count[0] += 1
        if count[0] > limit:
            raise CheckpointError(f"its configuration builds a model of more than {limit} modules and tensors")

    handles = [module_hooks.register_module_module_registration_hook(hook),
               module_hooks.register_module_parameter_registration_hook(hook),
               module_hooks.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_config_builds(path: str, config: Dict, state_dict: Dict) -> None:
    """Builds the configuration on the meta device (nothing allocated; a bounded number of modules, set by the
    size of the saved state dict) and checks it has exactly the saved entries and shapes."""
    try:
        with _registration_budget(_BUILD_BUDGET_PER_ENTRY * len(state_dict) + _BUILD_BUDGET_MIN), \
                torch.device("meta"):
            expected = _shapes(build_model(config).state_dict())
    except Exception as err:
        raise CheckpointError(f"{path}: its configuration does not build a model: {type(err).__name__}: "
                              f"{str(err)[:300]}") from None
    saved = _shapes(state_dict)
    if expected != saved:
        diff = sorted(set(expected.items()) ^ set(saved.items()), key=str)[:4]
        raise CheckpointError(f"{path}: its configuration does not match its state dict (entries differ, e.g. "
                              f"{diff})")


def _shapes(state_dict: Dict) -> Dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state_dict.items()}


def _digest(payload: Dict) -> str:
    """sha256 of config, state_dict and extra: structure, types, and every tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in ("config", "state_dict", "extra"):
        h.update(key.encode())
        _update(h, payload.get(key))
    return h.hexdigest()


def _update(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}|".encode())
        for k, v in value.items():
            _update(h, k)
            _update(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}|".encode())
        for v in value:
            _update(h, v)
    elif isinstance(value, float):
        h.update(f"f{value.hex() if math.isfinite(value) else value}|".encode())
    else:  # str, int, bool, None and other plain values
        h.update(f"{type(value).__name__}:{value!r}|".encode())


# Settings that do not change the architecture or the state dict's meaning: a checkpoint loads across them.
_RUNTIME = ("execution", "backend")
_POLICY_RUNTIME = ("tau", "sample_in_eval", "backend")


def _architecture(config: Dict) -> Dict:
    arch = {k: v for k, v in config.items() if k not in _RUNTIME}
    if arch.get("policy") is not None:
        arch["policy"] = {k: v for k, v in arch["policy"].items() if k not in _POLICY_RUNTIME}
    return arch


def _summary(config: Dict) -> str:
    if config.get("kind") == "backbone":
        return f"plain backbone {config.get('backbone')}"
    return (f"{config.get('strategy')} on {config.get('backbone')} with adaptive blocks "
            f"{config.get('adaptive_blocks')}, policy {config.get('policy')}")
