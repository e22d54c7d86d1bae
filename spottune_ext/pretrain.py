"""Pre-train the demo's ResNet source model on Fashion-MNIST and write it as a small backbone checkpoint.

No ImageNet ResNet weights install from a package registry, so the project makes its own source
model: a narrow ResNet-26 (spottune_ext.models.DecathlonResNet, widths 16/32/64, two blocks per stage,
32x32 inputs) trained from scratch on a class-balanced subset of Fashion-MNIST's training split.

    python -m spottune_ext.pretrain                    # writes spottune_ext/assets/fashion_resnet26.pt

It writes <name>.pt (a spottune_ext backbone checkpoint: architecture + weights), <name>.pt.sha256
and <name>.json (the command, the training report and the file's sha256). With the same seed and
thread count the training is deterministic on a CPU, so the command reproduces the file's weights.
"""
import argparse
import shlex
import sys
from pathlib import Path

from . import train
from .io import write_json, write_text
from .models import load_checkpoint, save_checkpoint
from .models.weights import sha256_of

ASSETS = Path(__file__).resolve().parent / "assets"
NAME = "fashion_resnet26"

# The training run: the trainer's own arguments (standard training of every layer from random init).
TRAIN_ARGS = ["--arch", "resnet26", "--widths", "16", "32", "64", "--layers", "2", "2", "2", "--stem-width", "16",
              "--data", "fashion-mnist", "--image-size", "32", "--max-per-class", "1500", "--max-eval-per-class", "200",
              "--strategy", "finetune", "--epochs", "6", "--batch-size", "64", "--lr", "0.1", "--wd", "5e-4",
              "--lr-steps", "4", "--seed", "0", "--threads", "2"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m spottune_ext.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ASSETS), help="directory of the checkpoint")
    parser.add_argument("--work", default="runs/pretrain-fashion",
                        help="directory of the training run (a previous run there is replaced)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train_args = TRAIN_ARGS + ["--out", args.work, "--overwrite"] + (["--no-progress"] if args.no_progress else [])
    results = train.run(train.parse_args(train_args))
    model, _ = load_checkpoint(results["outputs"]["checkpoint"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.pt"
    save_checkpoint(model.backbone, str(path))  # the plain network: every block was trained in place
    digest = sha256_of(path)
    write_text(out / f"{NAME}.pt.sha256", f"{digest}  {path.name}\n")
    command = "python -m spottune_ext.pretrain" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    report = {"file": path.name, "sha256": digest, "command": command, "train_args": TRAIN_ARGS,
              "test_accuracy": results["test"]["accuracy"], "val_accuracy": results["val"]["accuracy"],
              "train_split": results["train_split"], "selection": results["selection"],
              "images": results["images"], "train_time_s": results["train_time_s"],
              "parameters": sum(p.numel() for p in model.backbone.parameters())}
    write_json(out / f"{NAME}.json", report)
    print(f"wrote {path} (sha256 {digest}); Fashion-MNIST test accuracy {report['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
