"""Datasets for fine-tuning ImageNet-pre-trained networks, read from disk only (nothing is downloaded).

    train, val, test, num_classes, class_names = build_datasets("animal-mnist", image_size=64, seed=0)

`build_datasets` takes a name from DATASETS (data that installable packages ship) or a directory: a
Visual Decathlon root (it has annotations/; pass domain=...) or a class-per-folder image directory.
Train, validation and test never share a sample; merge_train_val joins the first two only on request.
"""
from pathlib import Path

import numpy as np

from .builtin import (load_animal_mnist, load_digits, load_elpv, load_fashion_mnist, load_mnist_5k,
                      read_idx)
from .datasets import (IMAGENET_MEAN, IMAGENET_STD, ArrayImageDataset, DataNotFoundError, FileImageDataset,
                       ImageClassificationDataset, MergedDataset, merge_train_val, preprocess)
from .decathlon import decathlon_domains, load_decathlon
from .imagefolder import load_image_folder
from .splits import cap_per_class, stratified_split

# name -> loader(root, image_size) returning {"train": pool} or {"train": ..., "test": official test}.
DATASETS = {
    "animal-mnist": load_animal_mnist,
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "digits": load_digits,
    "elpv": load_elpv,
}


def _load(name_or_path, image_size, root, domain):
    key = str(name_or_path).lower().replace("_", "-")
    if key in DATASETS:
        if domain is not None:
            raise ValueError(f"domain= is for Visual Decathlon directories, not the built-in {key!r}")
        return DATASETS[key](root, image_size)
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown dataset {str(name_or_path)!r}: not one of the built-in {sorted(DATASETS)} "
                         f"and no such directory")
    if root is not None:
        raise ValueError("root= is for the built-in datasets; for a directory pass it as name_or_path")
    if (path / "annotations").is_dir():
        return load_decathlon(path, domain, image_size)
    if domain is not None:
        raise ValueError(f"domain= is for Visual Decathlon directories, and {path} has no annotations/")
    return load_image_folder(path, image_size)


def build_datasets(name_or_path, image_size, seed=0, *, root=None, domain=None, val_fraction=0.1,
                   test_fraction=0.2, max_per_class=None, train_transform=None):
    """(train, val, test, num_classes, class_names) of a built-in dataset or a data directory.

    Splits the data does not come with are carved out of its training pool, stratified by class with
    `seed`: with neither validation nor test split, val_fraction and test_fraction of the pool; with an
    official test split only (Fashion-MNIST, Decathlon), val_fraction of the training split; with a
    validation split only, test_fraction of the training split. The same seed gives the same splits.

    image_size: side S of the [3, S, S] tensors. root: directory of a built-in dataset's files (default:
    where its package installs them). domain: the Visual Decathlon domain. max_per_class: keep at most
    that many samples of each class in every split (fixed-seed choice), for quick runs.
    train_transform: callable applied to training tensors only (augmentation).
    """
    splits = _load(name_or_path, image_size, root, domain)
    pool = splits["train"]
    if "val" not in splits and "test" not in splits:
        parts = stratified_split(pool.targets, (val_fraction, test_fraction), seed)
        splits = dict(zip(("train", "val", "test"), (pool.subset(p) for p in parts)))
    elif "val" not in splits or "test" not in splits:
        missing = "val" if "val" not in splits else "test"
        train_idx, carved = stratified_split(pool.targets, (val_fraction if missing == "val" else test_fraction,),
                                             seed)
        splits.update(train=pool.subset(train_idx), **{missing: pool.subset(carved)})
    if max_per_class is not None:
        splits = {name: d.subset(cap_per_class(d.targets, np.arange(len(d)), int(max_per_class), seed))
                  for name, d in splits.items()}
    train = splits["train"].subset(np.arange(len(splits["train"])), transform=train_transform)
    return train, splits["val"], splits["test"], len(pool.classes), list(pool.classes)


__all__ = [
    "DATASETS", "build_datasets", "merge_train_val", "stratified_split", "cap_per_class", "preprocess",
    "read_idx", "decathlon_domains", "load_decathlon", "load_image_folder", "ImageClassificationDataset",
    "ArrayImageDataset", "FileImageDataset", "MergedDataset", "DataNotFoundError", "IMAGENET_MEAN",
    "IMAGENET_STD",
]
