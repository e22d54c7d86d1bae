"""The splits the arguments describe and the training loader over them."""
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from ..data import DataNotFoundError, build_datasets, cap_per_class, merge_train_val
from .errors import UsageError


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


def train_loader(dataset, args, world, rank, pin_memory):
    """(loader, sampler): each process its own shuffled share of the training set (sampler.set_epoch
    reshuffles), with no ragged last batch for BatchNorm's statistics."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=pin_memory, drop_last=len(sampler) > args.batch_size)
    return loader, sampler
