"""Policy figures and policy files."""
import csv

import numpy as np
import pytest
import torch

from spottune_ext.plots import (block_usage, class_block_usage, plot_block_usage, plot_class_block_usage,
                                plot_finetuned_histogram, save_policies)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


@pytest.fixture
def policies():
    # 3 classes, 12 blocks; class c fine-tunes blocks c, c+3, ... with probability 0.9.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    prob = np.array([[0.9 if (b - c) % 3 == 0 else 0.1 for b in range(12)] for c in range(3)])
    return (rng.random((60, 12)) < prob[labels]).astype(np.int64), labels


def test_block_usage_and_class_block_usage(policies):
    p, labels = policies
    np.testing.assert_allclose(block_usage(p), p.mean(0))
    np.testing.assert_allclose(block_usage(torch.from_numpy(p)), p.mean(0))
    usage = class_block_usage(p, labels, 4)
    assert usage.shape == (4, 12) and np.isnan(usage[3]).all()
    for c in range(3):
        np.testing.assert_allclose(usage[c], p[labels == c].mean(0))
    assert usage[0, 0] > 0.6 and usage[0, 1] < 0.4


def test_policy_validation():
    with pytest.raises(ValueError, match=r"0/1 array \[N images, L blocks\]"):
        block_usage(np.array([[0, 2]]))
    with pytest.raises(ValueError, match=r"0/1 array"):
        block_usage(np.zeros(5))
    with pytest.raises(ValueError, match=r"labels must be \[N=2\]"):
        class_block_usage(np.zeros((2, 3)), [0], 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        class_block_usage(np.zeros((2, 3)), [0, 2], 2)


def test_plot_block_usage(tmp_path, policies):
    p, _ = policies
    assert_png(plot_block_usage(tmp_path / "one.png", block_usage(p)))
    rows = np.stack([block_usage(p), block_usage(1 - p)])
    assert_png(plot_block_usage(tmp_path / "sub" / "two.png", rows, row_labels=["cub", "cars"]))
    with pytest.raises(ValueError, match="2 row labels for 1 rows"):
        plot_block_usage(tmp_path / "x.png", block_usage(p), row_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        plot_block_usage(tmp_path / "x.png", np.array([0.5, 1.5]))
    assert not (tmp_path / "x.png").exists()


def test_plot_class_block_usage(tmp_path, policies):
    p, labels = policies
    assert_png(plot_class_block_usage(tmp_path / "classes.png", torch.from_numpy(p), labels,
                                      ["bear", "bird", "cat", "empty class"]))


def test_plot_class_block_usage_many_classes(tmp_path):
    rng = np.random.default_rng(1)
    path = plot_class_block_usage(tmp_path / "200.png", rng.integers(0, 2, (400, 12)), rng.integers(0, 200, 400),
                                  [f"species {i}" for i in range(200)])
    assert_png(path)


def test_plot_finetuned_histogram(tmp_path, policies):
    p, _ = policies
    assert_png(plot_finetuned_histogram(tmp_path / "hist.png", p))
    assert_png(plot_finetuned_histogram(tmp_path / "hists.png", {"cub": p, "cars": 1 - p}))
    with pytest.raises(ValueError, match="no policies"):
        plot_finetuned_histogram(tmp_path / "none.png", {})


def test_save_policies_npz(tmp_path, policies):
    p, labels = policies
    path = save_policies(tmp_path / "policies.npz", torch.from_numpy(p), labels, predictions=labels[::-1],
                         class_names=["a", "b", "c"])
    with np.load(path) as f:
        np.testing.assert_array_equal(f["policies"], p)
        np.testing.assert_array_equal(f["labels"], labels)
        np.testing.assert_array_equal(f["predictions"], labels[::-1])
        assert f["class_names"].tolist() == ["a", "b", "c"]


def test_save_policies_csv(tmp_path, policies):
    p, labels = policies
    path = save_policies(tmp_path / "policies.csv", p, labels, class_names=["a", "b", "c"])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "label"] + [f"block_{b}" for b in range(1, 13)]
    assert len(rows) == 61
    assert rows[25][:2] == ["24", "b"] and [int(v) for v in rows[25][2:]] == p[24].tolist()
    path = save_policies(tmp_path / "plain.csv", p[:2], labels[:2], predictions=[2, 0])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["image", "label", "prediction"] and rows[2][:3] == ["1", "0", "0"]


def test_save_policies_errors(tmp_path, policies):
    p, labels = policies
    with pytest.raises(ValueError, match="use a .npz or .csv path"):
        save_policies(tmp_path / "p.txt", p, labels)
    with pytest.raises(ValueError, match=r"predictions must be \[N=60\]"):
        save_policies(tmp_path / "p.npz", p, labels, predictions=[1, 2])
