"""Checkpoints: the state dict plus the configuration that rebuilds the model, written atomically.

save_checkpoint(model, path) takes a SpotTuneModel (from convert) or a plain supported backbone (e.g. what
export_global returns); load_checkpoint(path) rebuilds it (random init, then the saved state, strictly),
or loads into a given model after checking it has the same configuration.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..io import atomic_write
from . import families
from .convert import SpotTuneModel, convert
from .policy import PolicyNet

FORMAT = "spottune_ext.checkpoint"
VERSION = 1


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
    """Writes {configuration, state dict, extra} to `path` atomically (temporary file + os.replace).

    extra: anything else to keep (epoch, optimizer.state_dict(), ...), made of tensors, numbers,
    strings, lists and dicts so that it loads with torch.load(weights_only=True).
    """
    payload = {"format": FORMAT, "version": VERSION, "config": model_config(model), "state_dict": model.state_dict(),
               "extra": extra or {}}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str, model: Optional[nn.Module] = None,
                    map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Returns (model, extra). Without `model`, rebuilds the saved model; with one, loads into it after
    checking its configuration equals the saved one (a ValueError names both otherwise)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a spottune_ext checkpoint (save one with spottune_ext.save_checkpoint)")
    if payload["version"] > VERSION:
        raise ValueError(f"{path} is a checkpoint of format version {payload['version']}; this spottune_ext reads "
                         f"up to version {VERSION}")
    config = payload["config"]
    if model is None:
        model = build_model(config)
    else:
        own = model_config(model)
        if _architecture(own) != _architecture(config):
            raise ValueError(f"{path} holds a different model: saved {_summary(config)}, given {_summary(own)}")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model, payload["extra"]


# Settings that do not change the architecture or the state dict's meaning: a checkpoint loads across them.
_RUNTIME = ("execution", "backend")
_POLICY_RUNTIME = ("tau", "sample_in_eval", "backend")


def _architecture(config: Dict) -> Dict:
    arch = {k: v for k, v in config.items() if k not in _RUNTIME}
    if arch.get("policy") is not None:
        arch["policy"] = {k: v for k, v in arch["policy"].items() if k not in _POLICY_RUNTIME}
    return arch


def _summary(config: Dict) -> str:
    if config["kind"] == "backbone":
        return f"plain backbone {config['backbone']}"
    return (f"{config['strategy']} on {config['backbone']} with adaptive blocks {config['adaptive_blocks']}, "
            f"policy {config['policy']}")
