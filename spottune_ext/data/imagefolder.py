"""Class-per-folder image directories (CUB-200, Stanford Cars, Flowers, Sketches, WikiArt, ...).

Two layouts are read:

    root/train/<class>/<image>      root/<class>/<image>
    root/val/<class>/<image>        (one pool, split with the fixed seed)
    root/test/<class>/<image>
    (val/ and test/ optional)

Classes are the sorted folder names of train/ (or of root); val/ and test/ may lack classes but may
not add any. Hidden files and files without an image extension are ignored.
"""
from .datasets import DataNotFoundError, FileImageDataset, check_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _class_dirs(path):
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path):
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_split(path, image_size, classes=None):
    """FileImageDataset of one split directory; its classes are `classes` or its own sorted folders."""
    path = check_dir(path, "image folder")
    dirs = _class_dirs(path)
    if not dirs:
        raise DataNotFoundError(f"image folder: {path} has no class folders (expected {path}/<class>/<image>)")
    names = [d.name for d in dirs] if classes is None else classes
    unknown = sorted({d.name for d in dirs} - set(names))
    if unknown:
        raise ValueError(f"image folder: {path} has classes absent from the training split: {unknown}")
    index = {name: i for i, name in enumerate(names)}
    paths, targets = [], []
    for d in dirs:
        files = _images(d)
        if not files:
            raise DataNotFoundError(f"image folder: class folder {d} holds no image "
                                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        targets += [index[d.name]] * len(files)
    return FileImageDataset(paths, targets, names, image_size)


def load_image_folder(root, image_size):
    """{"train": ..., and "val"/"test" where those folders exist} from either layout above."""
    root = check_dir(root, "image folder")
    if not (root / "train").is_dir():
        return {"train": _read_split(root, image_size)}
    splits = {"train": _read_split(root / "train", image_size)}
    for name in ("val", "test"):
        if (root / name).is_dir():
            splits[name] = _read_split(root / name, image_size, splits["train"].classes)
    return splits
