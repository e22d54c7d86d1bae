"""The trainer's --amp and --compile, end to end on tiny data and a tiny model (python -m spottune_ext.train)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spottune_ext.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}

# As tests/test_train.py: a ResNet-26-like backbone of three 1-block stages on 16x16 digits.
TINY = ["--arch", "resnet26", "--widths", "8", "16", "16", "--layers", "1", "1", "1", "--stem-width", "8",
        "--data", "digits", "--image-size", "16", "--max-per-class", "6", "--max-eval-per-class", "2",
        "--batch-size", "16", "--max-train-batches", "3", "--threads", "1", "--no-progress",
        "--strategy", "spottune", "--policy-widths", "32", "--epochs", "1", "--device", "cpu"]


def _train(out, *extra, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "spottune_ext.train", *TINY, "--out", str(out), *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"]) and math.isfinite(metrics[0]["val_loss"])
    assert 0 <= results["test"]["accuracy"] <= 1
    return metrics[0]


def _moved(out, reference_out):
    """Names of the trainable parameters whose trained values differ between two runs' checkpoints."""
    a, _ = load_checkpoint(str(out / "last.pt"))
    b, _ = load_checkpoint(str(reference_out / "last.pt"))
    return [n for n, p in a.named_parameters() if not torch.equal(p, b.state_dict()[n])]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return out, _train(out)


def test_amp_trains_on_cpu(tmp_path, plain_run):
    """bfloat16 autocast on the CPU: the routed blocks' backward (decision gradient included) runs, and
    the training loss stays within bfloat16's reach of the float32 run's (same seed, same batches)."""
    metrics = _train(tmp_path, "--amp")
    assert metrics["train_loss"] == pytest.approx(plain_run[1]["train_loss"], rel=0.05)
    assert _moved(tmp_path, plain_run[0])  # a different run: autocast did change the arithmetic


def test_compile_trains_on_cpu(tmp_path, plain_run):
    """torch.compile of the training forward (inductor, generated code included)."""
    metrics = _train(tmp_path, "--compile")
    # The compiled graph draws its own Gumbel noise, so routes, and the loss, differ from the eager run's.
    assert metrics["train_loss"] == pytest.approx(plain_run[1]["train_loss"], rel=0.2)
