"""The model the arguments describe: the pre-trained backbone, its conversion to the strategy, and the
optimiser and learning-rate schedule that train it."""
import os

import torch
import torchvision

from ..models import STRATEGIES, DecathlonResNet, SpotTuneModel, convert, load_checkpoint, read_weights
from ..models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..models.families import family_of, match_classifier
from ..models.weights import sha256_of
from .cli import strategy_options
from .errors import UsageError, first_line


def _is_checkpoint(path):
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: read_weights explains
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def build_backbone(args):
    """(the pre-trained plain backbone named by --arch / --weights, its architecture name)."""
    if args.weights and os.path.isfile(args.weights) and args.weights_sha256:
        actual = sha256_of(args.weights)
        if not actual.startswith(args.weights_sha256.lower()):
            raise UsageError(f"--weights {args.weights}: sha256 {actual} does not start with --weights-sha256 "
                             f"{args.weights_sha256}")
    if args.weights and os.path.isfile(args.weights) and _is_checkpoint(args.weights):
        try:
            backbone, _ = load_checkpoint(args.weights)
        except (ValueError, TypeError, RuntimeError) as err:
            raise UsageError(f"--weights {args.weights}: {first_line(err)}") from None
        if isinstance(backbone, SpotTuneModel):
            raise UsageError(f"--weights {args.weights} is a fine-tuned SpotTune checkpoint; pass a plain backbone "
                             f"(to continue a run, use --resume)")
        arch = family_of(backbone).arch_of(backbone)
        if args.arch is not None and args.arch != arch:
            raise UsageError(f"--weights {args.weights} holds a {arch}, not the --arch {args.arch}")
        if args.widths or args.layers or args.stem_width:
            raise UsageError(f"--widths, --layers and --stem-width cannot reshape the backbone that --weights "
                             f"{args.weights} holds")
        return backbone, arch
    if args.arch is None:
        raise UsageError(f"--arch is required: --weights {args.weights} is not a spottune_ext backbone checkpoint")
    if args.arch == "resnet26":
        widths = args.widths or [64, 128, 256]
        layers = args.layers or [4] * len(widths)
        if len(layers) != len(widths):
            raise UsageError(f"--layers {layers} and --widths {widths} need one block count per width")
        stem = args.stem_width or 32
        if stem > widths[0] or any(b < a for a, b in zip(widths, widths[1:])):
            raise UsageError(f"--stem-width {stem} and --widths {widths} must not shrink (the parameter-free "
                             f"shortcuts of a resnet26 pad channels)")
        backbone = DecathlonResNet(1000, layers, widths, stem)
    else:
        backbone = torchvision.models.get_model(args.arch, weights=None)
    if args.weights:
        try:
            state = read_weights(args.weights, args.weights_sha256)
            match_classifier(backbone, state)
        except (ValueError, FileNotFoundError) as err:  # missing, not a state dict, another classifier
            raise UsageError(f"--weights: {first_line(err)}") from None
        except Exception as err:  # whatever torch.load makes of a file that is no torch file
            raise UsageError(f"--weights {args.weights}: not a readable weights file "
                             f"({type(err).__name__}: {first_line(err)})") from None
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UsageError(f"--weights {args.weights} does not fit --arch {args.arch}: {first_line(err)}") from None
    return backbone, args.arch


def build_model(args, backbone, num_classes):
    """convert() of the backbone as --strategy and the policy flags say."""
    policy = None
    if STRATEGIES[args.strategy].uses_policy:
        # flags that shape the policy describe it over PolicyNet's defaults; without them, a preset
        shape = {key: value for key, value in (("widths", args.policy_widths), ("stem_width", args.policy_stem_width),
                                               ("input_size", args.policy_input_size),
                                               ("input_scale", args.policy_input_scale)) if value}
        policy = shape or family_of(backbone).policy_defaults(args.policy_size or "sized")
        policy["sample_in_eval"] = args.eval_sample
        if args.policy_init_tuned is not None:
            policy["init_tuned"] = None if args.policy_init_tuned == "none" else args.policy_init_tuned
    blocks = len(family_of(backbone).blocks(backbone))
    if args.adaptive_blocks and max(args.adaptive_blocks) >= blocks:
        raise UsageError(f"--adaptive-blocks must be block indices in 0..{blocks - 1} ({args.arch} has {blocks} "
                         f"blocks), got {args.adaptive_blocks}")
    try:
        net = convert(backbone, num_classes=num_classes, policy=policy, adaptive_blocks=args.adaptive_blocks,
                       strategy=args.strategy, tau=args.tau, execution=args.execution, backend=args.backend,
                       frozen_bn=args.frozen_bn, bn_stats=args.bn_stats, **strategy_options(args))
    except (ValueError, TypeError) as err:
        given = "".join(f" {flag} {value}" for flag, value in (
            ("--strategy-opt", " ".join(args.strategy_opt)), ("--global-k", args.global_k),
            ("--lambda1", args.lambda1), ("--lambda2", args.lambda2)) if value not in (None, ""))
        raise UsageError(f"--strategy {args.strategy}{given}: {err}") from None
    if args.global_k is not None and args.global_k > net.num_routed:
        raise UsageError(f"--global-k {args.global_k:g}: more than the {net.num_routed} routed blocks")
    return net


def check_image_size(net, args, device):
    """Refuses image sizes the network cannot take: below its total stride (its last strided stages would
    get maps smaller than their stride, mostly padding) or failing a dry forward on a batch of two."""
    stride = family_of(net.backbone).total_stride(net.backbone)
    if args.image_size < stride:
        raise UsageError(f"--image-size {args.image_size} is too small for {args.arch}: it downsamples by {stride}, "
                         f"so images must be at least {stride}x{stride}")
    if net.policy is not None:
        size = net.policy.input_size or int(args.image_size * (net.policy.input_scale or 1))
        policy_stride = 2 ** len(net.policy.widths)
        if size < policy_stride:
            raise UsageError(f"the policy network downsamples by {policy_stride} and reads {size}x{size} images; "
                             f"raise --image-size or --policy-input-size (or --policy-input-scale) so that it "
                             f"reads at least {policy_stride}x{policy_stride}")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, 3, args.image_size, args.image_size, device=device))
    except RuntimeError as err:
        raise UsageError(f"--image-size {args.image_size}: {args.arch} cannot run on these images "
                         f"({first_line(err)})") from None
    finally:
        net.reset_usage()
        net.train(was_training)


def make_optimizer(net, args):
    """SGD with momentum: one parameter group for the network, one for the policy (own lr and decay)."""
    policy_ids = set() if net.policy is None else {id(p) for p in net.policy.parameters()}
    network = [p for p in net.parameters() if p.requires_grad and id(p) not in policy_ids]
    groups = [{"params": network, "lr": args.lr, "weight_decay": args.wd, "name": "network"}]
    if net.policy is not None:
        groups.append({"params": list(net.policy.parameters()), "lr": args.policy_lr,
                       "weight_decay": args.policy_wd, "name": "policy"})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def make_scheduler(optimizer, steps, gamma):
    """Multiplies every group's learning rate by gamma at each epoch listed in `steps` (stepped once per
    epoch): with steps 40 60 80 and gamma 0.1, lr 0.1 is 0.01 from epoch 40, 1e-3 from 60, 1e-4 from 80."""
    if sorted(set(steps)) != list(steps) or any(s < 1 for s in steps):
        raise UsageError(f"--lr-steps must be increasing epochs >= 1, got {list(steps)}")
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(steps), gamma=gamma)
