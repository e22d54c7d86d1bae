"""Fine-tuning strategies (paper Table 2), selectable by name in convert(model, strategy=...).

A strategy says, for the adaptive blocks convert() was given (the others stay frozen):
  - each block's mode: "routed" (frozen and fine-tuned copy, chosen per image), "tuned" (one trainable
    copy in place) or "frozen" (one frozen copy in place);
  - who decides the routed blocks per image (a learned policy network or coin flips);
  - which other parameters train (the classifier always does; the stem only where said);
  - the loss terms it adds (model.extra_loss());
  - the parameters it ships (shipped_parameters): what inference on the target task needs.

  spottune             every adaptive block routed by a learned policy (sec. 3)
  spottune_tuned_only  trained as spottune; in eval mode every image takes the fine-tuned blocks
  global_k             spottune + global-k losses (sec. 3.3, options k, lambda1, lambda2); ships the
                       plain network export_global() makes
  random_policy        last `last` (3) blocks fine-tuned, the others routed by coin flips with
                       probability p (0.5) per image, in training and evaluation
  finetune             standard fine-tuning: everything trains
  feature_extractor    only the classifier trains
  finetune_last_k      the last k (1, 2 or 3) blocks and the classifier train
  stochastic           a random half of the blocks (drawn once, option seed) and the classifier train
  l2sp                 everything trains, with the L2-SP penalty (Li et al. 2018) toward the
                       pre-trained weights: alpha/2 ||w - w0||^2 + beta/2 ||w_classifier||^2
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import global_k as gk


class Strategy:
    name = ""
    uses_policy = False    # a learned policy network decides the routed blocks
    train_stem = False     # the layers outside the blocks (stem, last conv, final BN) train too
    exports_plain = False  # deployed as the plain backbone export_global() makes
    has_extra_loss = False  # extra_loss() is not always 0 (the model attaches it to its logits)

    def options(self) -> Dict:
        """The options that rebuild this strategy (stored in checkpoints)."""
        return {}

    def block_modes(self, num_blocks: int) -> List[str]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Called once by convert() on the new model (e.g. to keep pre-trained weights)."""

    def decide(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, str]:
        """Decisions [B, L] for the routed blocks and how they were made."""
        return x.new_zeros((x.shape[0], 0)), "fixed"

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        """The loss terms this strategy adds to the task loss (0 for most)."""
        return torch.zeros((), device=_device(model))

    def shipped_parameters(self, model: nn.Module) -> int:
        """Parameters the deployed model holds: the plain backbone's if exported, else everything."""
        if self.exports_plain:
            return model.plain_parameter_count()
        return sum(p.numel() for p in model.parameters())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class SpotTune(Strategy):
    name = "spottune"
    uses_policy = True

    def block_modes(self, num_blocks):
        return ["routed"] * num_blocks

    def decide(self, model, x):
        decisions = model.policy(x)
        return decisions, model.policy.last_mode


class SpotTuneTunedOnly(SpotTune):
    name = "spottune_tuned_only"
    exports_plain = True

    def decide(self, model, x):
        if model.training:
            return super().decide(model, x)
        return x.new_ones((x.shape[0], model.num_routed)), "all_tuned"


class GlobalK(SpotTune):
    """Defaults: k = 3 as in the paper's experiments; the paper gives no lambda values."""
    name = "global_k"
    exports_plain = True
    has_extra_loss = True

    def __init__(self, k: float = 3, lambda1: float = 1.0, lambda2: float = 1.0) -> None:
        if k < 0:
            raise ValueError(f"global_k: k must be >= 0, got {k!r}")
        self.k, self.lambda1, self.lambda2 = k, lambda1, lambda2

    def options(self):
        return {"k": self.k, "lambda1": self.lambda1, "lambda2": self.lambda2}

    def extra_loss(self, model):
        decisions = model.last_policy
        if decisions is None:
            raise RuntimeError("global_k: extra_loss() needs the decisions of a forward pass; run the model first")
        return self.lambda1 * gk.global_k_loss(decisions, self.k) + self.lambda2 * gk.entropy_loss(decisions)


class RandomPolicy(Strategy):
    name = "random_policy"

    def __init__(self, last: int = 3, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"random_policy: p must be in [0, 1], got {p!r}")
        if last < 0:
            raise ValueError(f"random_policy: last must be >= 0, got {last!r}")
        self.last, self.p = last, p

    def options(self):
        return {"last": self.last, "p": self.p}

    def block_modes(self, num_blocks):
        if self.last > num_blocks:
            raise ValueError(f"random_policy: last={self.last} but only {num_blocks} adaptive blocks")
        return ["routed"] * (num_blocks - self.last) + ["tuned"] * self.last

    def decide(self, model, x):
        decisions = torch.rand((x.shape[0], model.num_routed), device=x.device) < self.p
        return decisions.to(x.dtype), "random"


class Finetune(Strategy):
    name = "finetune"
    train_stem = True

    def block_modes(self, num_blocks):
        return ["tuned"] * num_blocks


class FeatureExtractor(Strategy):
    name = "feature_extractor"

    def block_modes(self, num_blocks):
        return ["frozen"] * num_blocks


class FinetuneLastK(Strategy):
    name = "finetune_last_k"

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"finetune_last_k: k must be an int >= 1, got {k!r}")
        self.k = k

    def options(self):
        return {"k": self.k}

    def block_modes(self, num_blocks):
        if self.k > num_blocks:
            raise ValueError(f"finetune_last_k: k={self.k} but only {num_blocks} adaptive blocks")
        return ["frozen"] * (num_blocks - self.k) + ["tuned"] * self.k


class Stochastic(Strategy):
    """Fine-tunes a random fraction of the blocks, drawn once (the paper: "randomly sample 50% of the
    blocks of the pre-trained network to fine-tune"). `blocks` fixes the draw (indices among the
    adaptive blocks); after convert() it holds the blocks drawn."""
    name = "stochastic"

    def __init__(self, fraction: float = 0.5, seed: int = 0, blocks: Optional[Sequence[int]] = None) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"stochastic: fraction must be in [0, 1], got {fraction!r}")
        self.fraction, self.seed = fraction, seed
        self.blocks = None if blocks is None else sorted(int(b) for b in blocks)

    def options(self):
        return {"fraction": self.fraction, "seed": self.seed, "blocks": self.blocks}

    def block_modes(self, num_blocks):
        if self.blocks is None:
            generator = torch.Generator().manual_seed(self.seed)
            count = round(self.fraction * num_blocks)
            self.blocks = sorted(torch.randperm(num_blocks, generator=generator)[:count].tolist())
        if any(not 0 <= b < num_blocks for b in self.blocks):
            raise ValueError(f"stochastic: blocks {self.blocks} out of range for {num_blocks} adaptive blocks")
        return ["tuned" if i in self.blocks else "frozen" for i in range(num_blocks)]


class L2SP(Strategy):
    """Everything trains; extra_loss() = alpha/2 sum ||w - w0||^2 over the backbone's pre-trained
    parameters + beta/2 ||w||^2 over the classifier. Use it without weight decay on the backbone."""
    name = "l2sp"
    train_stem = True
    has_extra_loss = True

    def __init__(self, alpha: float = 0.01, beta: float = 0.01) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"l2sp: alpha and beta must be >= 0, got {alpha!r}, {beta!r}")
        self.alpha, self.beta = alpha, beta

    def options(self):
        return {"alpha": self.alpha, "beta": self.beta}

    def block_modes(self, num_blocks):
        return ["tuned"] * num_blocks

    def attach(self, model):
        model.l2sp_anchor = _Anchor(_anchored(model))

    def extra_loss(self, model):
        anchored = _anchored(model)
        source = sum(((p - w0) ** 2).sum() for (_, p), w0 in zip(anchored, model.l2sp_anchor.values()))
        head = sum((p ** 2).sum() for p in model.classifier.parameters())
        return self.alpha / 2 * source + self.beta / 2 * head


def _anchored(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The backbone parameters L2-SP pulls toward their pre-trained values (all but the classifier)."""
    head = {id(p) for p in model.classifier.parameters()}
    return [(n, p) for n, p in model.backbone.named_parameters() if id(p) not in head]


class _Anchor(nn.Module):
    """Pre-trained values of the anchored parameters, as buffers (saved with the model, not trained)."""

    def __init__(self, params: List[Tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.names = [n for n, _ in params]
        for i, (_, p) in enumerate(params):
            self.register_buffer(f"w{i}", p.detach().clone())

    def values(self) -> List[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(len(self.names))]


STRATEGIES = {cls.name: cls for cls in (SpotTune, SpotTuneTunedOnly, GlobalK, RandomPolicy, Finetune, FeatureExtractor,
                                        FinetuneLastK, Stochastic, L2SP)}


def get_strategy(strategy, **options) -> Strategy:
    """A Strategy from its name and options (or a Strategy instance, returned as it is)."""
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError(f"options {sorted(options)} given with a {strategy.name} instance; set them on the instance")
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    try:
        return STRATEGIES[strategy](**options)
    except TypeError as err:
        raise TypeError(f"strategy {strategy!r} got unknown options {sorted(options)}: {err}") from None
