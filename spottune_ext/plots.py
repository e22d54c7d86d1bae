"""Figures of the learned routing policies, written as PNG files (matplotlib's Agg renderer, no display).

policies: [N, L] decisions per test image and routed block, 1 = the image went through the fine-tuned
copy, 0 = through the frozen one (numpy arrays or torch tensors).
"""
import csv
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import atomic_write

_MAX_ROW_LABELS = 60


def _as_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _policies(policies):
    p = _as_numpy(policies)
    if p.ndim != 2 or not np.isin(p, (0, 1)).all():
        raise ValueError(f"policies must be a 0/1 array [N images, L blocks], got shape {p.shape}")
    return p.astype(np.int64)


def block_usage(policies):
    """Fraction of images routed to the fine-tuned copy, per block: [L]."""
    p = _policies(policies)
    return p.mean(axis=0) if len(p) else np.zeros(p.shape[1])


def class_block_usage(policies, labels, num_classes):
    """[num_classes, L] fraction of each class's images routed to the fine-tuned copy (NaN: no image)."""
    p = _policies(policies)
    labels = _as_numpy(labels).astype(np.int64)
    if labels.shape != (len(p),):
        raise ValueError(f"labels must be [N={len(p)}], got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes)[:, None]
    sums = np.zeros((num_classes, p.shape[1]))
    np.add.at(sums, labels, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def _heatmap(path, matrix, row_labels, title, ylabel):
    rows, blocks = matrix.shape
    fig = Figure(figsize=(max(4.0, 0.45 * blocks + 2.5), min(30.0, max(2.6, 0.3 * rows + 1.2))),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(blocks), [str(b + 1) for b in range(blocks)])
    if not any(row_labels):
        ax.set_yticks([])
    elif rows <= _MAX_ROW_LABELS:  # beyond that (e.g. 200 bird species) labels overlap: row numbers instead
        ax.set_yticks(range(rows), row_labels)
        ax.set_ylabel(ylabel)
    else:
        ax.set_ylabel(ylabel)
    ax.set_xlabel("residual block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction fine-tuned")
    return _save(fig, path)


def plot_block_usage(path, usage, row_labels=None, title="Fine-tuned block usage"):
    """Heatmap (the paper's Fig. 3): rows = datasets (or a single row), columns = blocks, colour = fraction
    of images routed to the fine-tuned copy. usage: [L] or [D, L] fractions, e.g. from block_usage."""
    usage = np.atleast_2d(_as_numpy(usage).astype(np.float64))
    if usage.ndim != 2 or ((usage < 0) | (usage > 1)).any():
        raise ValueError(f"usage must hold fractions in [0, 1], [L] or [D, L]; got shape {usage.shape}")
    row_labels = list(row_labels) if row_labels is not None else [""] * len(usage)
    if len(row_labels) != len(usage):
        raise ValueError(f"got {len(row_labels)} row labels for {len(usage)} rows")
    return _heatmap(path, usage, row_labels, title, "dataset")


def plot_class_block_usage(path, policies, labels, class_names, title="Fine-tuned block usage per class"):
    """Heatmap: rows = classes, columns = blocks, colour = fraction of the class's images routed to the
    fine-tuned copy (blank for a class without images)."""
    usage = class_block_usage(policies, labels, len(class_names))
    return _heatmap(path, usage, list(class_names), title, "class")


def plot_finetuned_histogram(path, policies, title="Fine-tuned blocks per image"):
    """Histogram (the paper's Fig. 4) of the number of blocks each image sends through the fine-tuned copy.
    policies: [N, L], or {dataset name: [N, L]} for one panel per dataset."""
    groups = policies if isinstance(policies, dict) else {"": policies}
    if not groups:
        raise ValueError("plot_finetuned_histogram: no policies given")
    fig = Figure(figsize=(4.0 * len(groups), 3.2), layout="constrained")
    for i, (name, group) in enumerate(groups.items()):
        p = _policies(group)
        blocks = p.shape[1]
        counts = np.bincount(p.sum(axis=1), minlength=blocks + 1)
        ax = fig.add_subplot(1, len(groups), i + 1)
        ax.bar(np.arange(blocks + 1), counts / max(len(p), 1), width=0.8)
        ax.set_xticks(range(blocks + 1))
        ax.set_xlabel("number of fine-tuned blocks")
        ax.set_ylabel("fraction of images")
        ax.set_title(f"{title}: {name}" if name else title)
    return _save(fig, path)


def save_policies(path, policies, labels, predictions=None, class_names=None):
    """Write each image's policy (one 0/1 column per block) with its label (and prediction).

    The format follows the suffix: .npz (arrays policies, labels[, predictions, class_names]) or .csv
    (columns image, label[, prediction], block_1 ... block_L; label names when class_names is given).
    """
    path = Path(path)
    p = _policies(policies)
    labels = _as_numpy(labels).astype(np.int64)
    if labels.shape != (len(p),):
        raise ValueError(f"labels must be [N={len(p)}], got shape {labels.shape}")
    if predictions is not None:
        predictions = _as_numpy(predictions).astype(np.int64)
        if predictions.shape != (len(p),):
            raise ValueError(f"predictions must be [N={len(p)}], got shape {predictions.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {"policies": p.astype(np.uint8), "labels": labels}
        if predictions is not None:
            arrays["predictions"] = predictions
        if class_names is not None:
            arrays["class_names"] = np.asarray(list(class_names), dtype=str)
        with atomic_write(path, "wb") as f:
            np.savez_compressed(f, **arrays)
    elif path.suffix == ".csv":
        name = (lambda c: class_names[c]) if class_names is not None else (lambda c: c)
        with atomic_write(path, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"] + (["prediction"] if predictions is not None else [])
                            + [f"block_{b + 1}" for b in range(p.shape[1])])
            for i in range(len(p)):
                extra = [name(predictions[i])] if predictions is not None else []
                writer.writerow([i, name(labels[i])] + extra + p[i].tolist())
    else:
        raise ValueError(f"save_policies: unknown format {path.suffix!r}; use a .npz or .csv path")
    return path
