"""Interleaved timing of the matrix's executions (bench_models.py, SPOTTUNE_BENCH=matrix) at one image size.

    python bench/interleaved.py --size 64 --batch 32 --rounds 11 [--models resnet18 ...] [--out FILE.md]

pytest-benchmark times one execution's rounds after another's, so a machine whose speed drifts (a
shared CPU) can move a ratio of medians by tens of per cent. Here every round runs each execution
once, in turn, and each ratio is taken within a round: the table gives the median of those per-round
ratios and their interquartile range, at fraction 0.5, for the training step and for inference.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ["SPOTTUNE_BENCH"] = "matrix"
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import bench_models  # noqa: E402

# (measure, execution, compared with)
RATIOS = [("train-step", "grouped", "finetune"), ("train-step", "grouped", "dense"), ("train-step", "grouped", "split"),
          ("train-step", "split", "finetune"), ("train-step", "split", "dense"), ("inference", "grouped", "plain+policy"),
          ("inference", "grouped", "split"), ("inference", "split", "plain+policy")]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    bench_models.synchronize(bench_models.DEVICE)
    return time.perf_counter() - start


def measure(model_name, size, batch, rounds):
    """{(measure, execution): [seconds per round]}, the executions of each round run in turn."""
    case = bench_models._case(model_name, batch, size)
    calls = {}
    for impl in ("plain", "plain+policy", "split", "grouped"):
        fn = bench_models._inference_fn(case, impl, 0.5)
        calls["inference", impl] = lambda fn=fn: _no_grad(fn)
    for impl in ("finetune", "split", "dense", "grouped"):
        _, clear_grads, step = bench_models._train_setup(case, impl, 0.5)
        calls["train-step", impl] = lambda clear_grads=clear_grads, step=step: (clear_grads(), step())
    for call in calls.values():  # warm-up
        call()
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            times[key].append(_timed(call))
    return times


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def render(results, size, batch, rounds):
    lines = [f"{rounds} interleaved rounds, {size}x{size}, batch {batch}, fraction 0.5, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}: median of the per-round ratios "
             "[interquartile range].", "",
             "| model | " + " | ".join(f"{m.replace('-step', '')}: {a} / {b}" for m, a, b in RATIOS) + " |",
             "|---|" + "---|" * len(RATIOS)]
    for model_name, times in results.items():
        cells = []
        for m, a, b in RATIOS:
            ratios = sorted(x / y for x, y in zip(times[m, a], times[m, b]))
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            cells.append(f"{statistics.median(ratios):.2f} [{q1:.2f}, {q3:.2f}]")
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--models", nargs="+", default=list(bench_models.MODELS), choices=list(bench_models.MODELS))
    parser.add_argument("--out", help="write the markdown here instead of printing it")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (quartiles)")
    results = {}
    for model_name in args.models:
        print(f"{model_name} ...", file=sys.stderr, flush=True)
        results[model_name] = measure(model_name, args.size, args.batch, args.rounds)
    text = render(results, args.size, args.batch, args.rounds)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
