"""One training epoch and one evaluation pass; a run stops as soon as training turns non-finite."""
import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..models import export_global
from . import dist
from .errors import Diverged


def autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _check_policy(net, watched, where):
    """Raises Diverged naming the first non-finite policy parameter, or the decisions."""
    decisions = net.last_policy
    finite = torch.stack([p.detach().isfinite().all() for _, p in watched] + [decisions.detach().isfinite().all()])
    if bool(finite.all()):  # one host sync per step
        return
    bad = [name for (name, _), ok in zip(watched, finite.tolist()) if not ok]
    what = f"policy parameter {bad[0]}" if bad else "the policy's decisions"
    raise Diverged(f"{what} became non-finite at {where}; lower --policy-lr or raise --tau")


def train_one_epoch(runner, net, loader, optimizer, scaler, args, device, epoch, world, progress):
    """Trains `runner` (net, or its DDP / compiled wrapper) for one epoch; returns loss, accuracy, images,
    time and images/s (summed over the processes)."""
    net.train()
    watched = [] if net.policy is None else [(f"policy.{n}", p) for n, p in net.policy.named_parameters()]
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    batches = len(loader) if args.max_train_batches is None else min(len(loader), args.max_train_batches)
    start = time.perf_counter()
    bar = progress(total=batches, desc=f"epoch {epoch + 1}/{args.epochs} train", leave=False)
    for step, (x, y) in enumerate(loader):
        if step >= batches:
            break
        where = f"epoch {epoch + 1}, batch {step + 1}"
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            try:
                logits = runner(x)
            except ValueError:  # route_plan refuses NaN decisions: name the policy that made them
                if watched and net.last_policy is not None:
                    _check_policy(net, watched, where)
                raise
            task = F.cross_entropy(logits, y)
            loss = task + net.extra_loss()
        if not torch.isfinite(loss):
            if watched:  # a policy gone non-finite is the cause to name, not the loss it spoilt
                _check_policy(net, watched, where)
            raise Diverged(f"the loss is {loss.item()} at {where}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if watched:
            _check_policy(net, watched, where)
        totals += torch.tensor([task.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                               dtype=torch.float64)
        bar.update(1)
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}",
                        img_s=f"{world * totals[2] / (time.perf_counter() - start):.0f}")
    bar.close()
    dist.all_reduce(totals, world)
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
        with autocast(device, args.amp):
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
    parts = dist.gather(part, world)
    order = np.argsort(np.concatenate([p["indices"] for p in parts]), kind="stable")
    merged = {k: np.concatenate([p[k] for p in parts])[order] for k in ("loss", "pred", "label", "policy")}
    n = len(merged["label"])
    return {"loss": float(merged["loss"].mean()), "accuracy": float((merged["pred"] == merged["label"]).mean()),
            "images": n, "images_per_s": n / max(max(p["time"] for p in parts), 1e-9),
            "decisions": "/".join(sorted(set().union(*(p["modes"] for p in parts)))),
            "predictions": merged["pred"], "labels": merged["label"], "policies": merged["policy"].astype(np.int64)}


class NoBar:
    """Stands in for tqdm where no progress is shown."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


@torch.no_grad()
def evaluate_exported(net, usage_set, test_set, args, device):
    """Accuracy of the plain network export_global() makes (a block takes its fine-tuned copy where the policy
    sends at least half of usage_set's images to it) on usage_set and test_set."""
    def batches(dataset):
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)

    def accuracy(model, dataset):
        correct = 0
        for x, y in batches(dataset):
            with autocast(device, args.amp):
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        return correct / len(dataset)

    plain = export_global(net, (x.to(device) for x, _ in batches(usage_set)), threshold=0.5).eval()
    return {"usage_split_accuracy": accuracy(plain, usage_set), "test_accuracy": accuracy(plain, test_set)}
