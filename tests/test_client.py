"""A real client: examples/classification/train.py, which never imports spottune_ext, builds a SpotTune
model by name through the launcher, trains one tiny epoch with EMA and a cosine schedule, resumes,
and evaluates the checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "classification" / "train.py"


def _image_folder(root, per_class=4, classes=3, size=36):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "spottune_ext.launch", "--strategy", "global_k", "--option", "k=2",
                             str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_reference_style_script_trains_resumes_and_evaluates(tmp_path):
    _image_folder(tmp_path / "data")
    common = ["--model", "spottune_resnet18", "--data-path", str(tmp_path / "data"), "--device", "cpu",
              "--batch-size", "4", "--lr", "0.01", "--lr-scheduler", "cosineannealinglr", "--model-ema",
              "--norm-weight-decay", "0", "--train-crop-size", "32", "--val-resize-size", "32",
              "--val-crop-size", "32", "--output-dir", str(tmp_path / "out")]
    first = _run(*common, "--epochs", "1")
    assert re.search(r"Epoch: \[0\] loss \d", first) and "Test: EMA Acc@1" in first
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    resumed = _run(*common, "--epochs", "2", "--resume", str(checkpoint))
    assert "Epoch: [0]" not in resumed and re.search(r"Epoch: \[1\] loss \d", resumed)
    ema_after_training = re.findall(r"Test: EMA Acc@1 ([\d.]+) loss ([\d.]+)", resumed)[-1]
    tested = _run(*common, "--epochs", "2", "--resume", str(checkpoint), "--test-only")
    assert re.findall(r"Test: EMA Acc@1 ([\d.]+) loss ([\d.]+)", tested) == [ema_after_training]
