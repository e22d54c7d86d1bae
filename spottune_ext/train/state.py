"""What a run needs beyond the model to continue bit for bit: random generator states, the arguments that
define the run, and the optimiser, scheduler and scaler states that last.pt holds."""
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..models import load_checkpoint
from ..models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from .errors import UsageError, first_line

# Arguments a resumed run must share with the run it continues (the model's own are checked by
# load_checkpoint; epochs may grow, and speed settings may change).
RUN_IDENTITY = ("data", "domain", "image_size", "max_per_class", "max_eval_per_class", "seed", "batch_size",
                "lr", "policy_lr", "momentum", "wd", "policy_wd", "lr_steps", "lr_gamma", "max_train_batches")
# What last.pt holds beside the model (checkpoint "extra").
TRAINING_STATE = ("epoch", "optimizer", "scheduler", "scaler", "rng", "best", "history", "world_size", "train_split",
                  "run")


def run_identity(args):
    return {name: getattr(args, name) for name in RUN_IDENTITY}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def resume_path(resume):
    """The checkpoint --resume names: the file itself, or last.pt in the directory."""
    path = Path(resume)
    return path / "last.pt" if path.is_dir() else path


def check_resume(args, world=None):
    """Refuses a --resume file that is missing, unreadable, not a last.pt of this trainer, or from a run
    with other defining arguments (world: the number of processes, default from WORLD_SIZE)."""
    path = resume_path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, truncated or not a torch file: say so in one line
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: {first_line(err)})"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path}: not a spottune_ext checkpoint")
    extra = payload.get("extra")
    if not isinstance(extra, dict) or "optimizer" not in extra:
        raise UsageError(f"--resume {path}: not a last.pt training checkpoint (it holds no optimiser state)")
    missing = [key for key in TRAINING_STATE if key not in extra]
    if missing:
        raise UsageError(f"--resume {path}: the training state lacks {missing}; it was not written by this trainer")
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if extra["world_size"] != world:
        raise UsageError(f"--resume {path}: saved by {extra['world_size']} processes, resumed by {world}")
    split_label = "train+val" if args.train_on_trainval else "train"
    if extra["train_split"] != split_label:
        raise UsageError(f"--resume {path}: that run trained on {extra['train_split']}, this one on {split_label} "
                         f"(--train-on-trainval)")
    changed = {k: (v, extra["run"].get(k)) for k, v in run_identity(args).items() if extra["run"].get(k) != v}
    if changed:
        raise UsageError(f"--resume {path}: these arguments differ from the run it continues (now, then): {changed}")
    if extra["epoch"] > args.epochs:
        raise UsageError(f"--resume {path}: that run already trained {extra['epoch']} epochs, more than --epochs "
                         f"{args.epochs}")


def restore(args, net, optimizer, scheduler, scaler, rank):
    """Loads model, optimiser, scheduler, scaler and this process's random state from the --resume file
    check_resume() accepted; returns (epochs done, best so far, metrics history)."""
    path = resume_path(args.resume)
    try:
        _, extra = load_checkpoint(str(path), model=net, map_location=next(net.parameters()).device)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"--resume {path}: {first_line(err)}") from None
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"][rank])
    return extra["epoch"], extra["best"], extra["history"]
