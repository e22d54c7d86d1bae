"""Image classification datasets that feed ImageNet-pre-trained networks.

Every sample comes out as a float tensor [3, S, S]: gray images are repeated over three channels,
the shorter side is resized to S (bilinear, antialiased) and the centre S x S is kept, then ImageNet's
mean and standard deviation are subtracted and divided out.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class DataNotFoundError(FileNotFoundError):
    """A data set's files or the package that ships them are missing (the message says how to get them)."""


def preprocess(image, image_size):
    """uint8 image [H, W] (gray) or [H, W, 3] (RGB) -> normalised float tensor [3, image_size, image_size]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"preprocess: expected a uint8 image [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
    x = torch.tensor(image)  # a copy: the source array may be read-only (e.g. a PIL buffer)
    x = (x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)).float().div_(255)
    h, w = x.shape[1:]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
        x = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        x = x[:, top:top + image_size, left:left + image_size]
    # Resize before repeating gray channels: a third of the work.
    return ((x.expand(3, -1, -1) - _MEAN) / _STD).contiguous()


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Base of the project's datasets: (image tensor [3, S, S], int label) pairs.

    targets: int64 labels [N]; classes: class names indexed by label; image_size: S;
    transform: optional callable applied to the normalised tensor (e.g. augmentation for training).
    Subclasses implement `_load(i)` (uint8 image) and `_select(indices)` (their samples at `indices`).
    """

    def __init__(self, targets, classes, image_size, transform=None):
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size}")
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.transform = transform
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got [{self.targets.min()}, "
                             f"{self.targets.max()}]")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = preprocess(self._load(i), self.image_size)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def subset(self, indices, transform=None):
        """A dataset of the same kind holding the samples at `indices`, with `transform`."""
        indices = np.asarray(indices, dtype=np.int64)
        return type(self)(*self._select(indices), self.targets[indices], self.classes, self.image_size, transform)

    def class_counts(self):
        return np.bincount(self.targets, minlength=len(self.classes))

    def _load(self, i):
        raise NotImplementedError

    def _select(self, indices):
        raise NotImplementedError


class ArrayImageDataset(ImageClassificationDataset):
    """Images held in memory: uint8 array [N, H, W] (gray) or [N, H, W, 3] (RGB)."""

    def __init__(self, images, targets, classes, image_size, transform=None):
        super().__init__(targets, classes, image_size, transform)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(self.targets):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 3] with N = {len(self.targets)}, got "
                             f"{images.dtype} {images.shape}")
        self.images = images

    def _load(self, i):
        return self.images[i]

    def _select(self, indices):
        return (self.images[indices],)


class FileImageDataset(ImageClassificationDataset):
    """Images read from files when indexed (any format Pillow reads)."""

    def __init__(self, paths, targets, classes, image_size, transform=None):
        super().__init__(targets, classes, image_size, transform)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != len(self.targets):
            raise ValueError(f"got {len(self.paths)} image paths for {len(self.targets)} labels")

    def _load(self, i):
        with Image.open(self.paths[i]) as image:
            return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))

    def _select(self, indices):
        return ([self.paths[i] for i in indices],)


class MergedDataset(torch.utils.data.ConcatDataset):
    """Several datasets with the same classes, read one after the other; `targets` and `classes` as theirs."""

    def __init__(self, datasets):
        super().__init__(datasets)
        self.classes = list(datasets[0].classes)
        self.image_size = datasets[0].image_size
        self.targets = np.concatenate([d.targets for d in datasets])

    def class_counts(self):
        return np.bincount(self.targets, minlength=len(self.classes))


def merge_train_val(train, val):
    """Train and validation samples as one training set (train's transform on both).

    Only for a final run whose hyper-parameters were chosen on `val` before: after merging, nothing
    but the test split remains to measure on.
    """
    if train.classes != val.classes or train.image_size != val.image_size:
        raise ValueError("merge_train_val: train and val must come from the same build_datasets call "
                         "(same classes and image size)")
    return MergedDataset([train, val.subset(np.arange(len(val)), transform=train.transform)])


def check_dir(path, what, install=None):
    """`path` as a Path; DataNotFoundError when it is missing or empty (naming `install`, the command
    that brings the files, when given)."""
    path = Path(path)
    hint = f"; install it with: {install}" if install else ""
    if not path.is_dir():
        raise DataNotFoundError(f"{what}: directory {path} does not exist{hint}")
    if not any(path.iterdir()):
        raise DataNotFoundError(f"{what}: directory {path} is empty{hint}")
    return path
