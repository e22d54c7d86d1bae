"""The Visual Decathlon layout (decathlon-1.0 devkit): one domain at a time.

    root/annotations/<domain>_train.json     COCO-style: "images": [{"id", "file_name", ...}],
    root/annotations/<domain>_val.json         "annotations": [{"image_id", "category_id", ...}],
    root/annotations/<domain>_test.json        "categories": [{"id", "name"}]   (test: optional)
    root/data/<domain>/<split>/<image>       images (the devkit ships them with shorter side 72)

Domains are aircraft, cifar100, daimlerpedcls, dtd, gtsrb, imagenet12, omniglot, svhn, ucf101 and
vgg-flowers; any <domain>_train.json is accepted. A "file_name" is resolved against root (devkit names
start with data/<domain>/) or, when it does not start with data/, against root/data. Category ids
(which the devkit offsets per domain) map to labels 0..C-1 in increasing id order.

The devkit's test labels are withheld (<domain>_test_stripped.json has no annotations, so it is not
read). Without a labelled <domain>_test.json, the official validation split becomes the test split and
validation is carved from the training split, so that no number is reported on data used for training
or model selection.
"""
import json
from pathlib import Path

from .datasets import DataNotFoundError, FileImageDataset, check_dir


def decathlon_domains(root):
    """Domains with a training annotation file under root/annotations (sorted)."""
    return sorted(p.name[:-len("_train.json")] for p in Path(root, "annotations").glob("*_train.json"))


def _read_annotations(path, root, image_size, categories=None):
    """(FileImageDataset, categories) of one annotation file. categories = (class names, label of each
    category id): read from the file, or given (the training split's) so that every split labels alike."""
    with open(path) as f:
        coco = json.load(f)
    for key in ("images", "annotations", "categories"):
        if not coco.get(key):
            raise ValueError(f"Decathlon: {path} has no {key!r} entries")
    if categories is None:
        listed = sorted(coco["categories"], key=lambda c: c["id"])
        categories = ([str(c["name"]) for c in listed], {c["id"]: i for i, c in enumerate(listed)})
    classes, label_of_category = categories
    label_of_image = {}
    for ann in coco["annotations"]:
        if ann["category_id"] not in label_of_category:
            raise ValueError(f"Decathlon: {path}: category id {ann['category_id']} of image {ann['image_id']} "
                             f"is not among the training split's categories")
        label_of_image[ann["image_id"]] = label_of_category[ann["category_id"]]
    unlabelled = [img["id"] for img in coco["images"] if img["id"] not in label_of_image]
    if unlabelled:
        raise ValueError(f"Decathlon: {path}: {len(unlabelled)} images have no annotation "
                         f"(e.g. image id {unlabelled[0]})")
    base = root if coco["images"][0]["file_name"].startswith("data/") else root / "data"
    paths = [base / img["file_name"] for img in coco["images"]]
    if not paths[0].is_file():
        raise DataNotFoundError(f"Decathlon: image {paths[0]} (listed in {path}) is missing; images belong "
                                f"under {root / 'data'}")
    targets = [label_of_image[img["id"]] for img in coco["images"]]
    return FileImageDataset(paths, targets, classes, image_size), categories


def load_decathlon(root, domain, image_size):
    """{"train", "test"} (or {"train", "val", "test"} with a labelled test file) of one domain."""
    root = check_dir(root, "Decathlon")
    check_dir(root / "annotations", "Decathlon annotations")
    domains = decathlon_domains(root)
    if domain is None or domain not in domains:
        raise ValueError(f"Decathlon: choose a domain with domain=...; {root / 'annotations'} has training "
                         f"annotations for {domains} (got domain={domain!r})")
    ann = root / "annotations"
    if not (ann / f"{domain}_val.json").is_file():
        raise DataNotFoundError(f"Decathlon: {ann / f'{domain}_val.json'} is missing")
    train, categories = _read_annotations(ann / f"{domain}_train.json", root, image_size)
    val, _ = _read_annotations(ann / f"{domain}_val.json", root, image_size, categories)
    if (ann / f"{domain}_test.json").is_file():
        test, _ = _read_annotations(ann / f"{domain}_test.json", root, image_size, categories)
        return {"train": train, "val": val, "test": test}
    return {"train": train, "test": val}
