"""Summarises a bench_models.py run with SPOTTUNE_BENCH=matrix: one row per model and image size.

    python bench/matrix.py RUN.json [--out SUMMARY.md] [--figure PNG]

Each cell is a ratio of medians from the same run and group (bench_models.py's module docstring says
what each execution measures); a cell with a target (extra_info["targets"]) is marked when it misses it.
The figure draws the training-step ratios per model against the image size.
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

# (column title, measure, execution, compared with)
COLUMNS = [
    ("train: grouped / dense", "train-step", "grouped", "dense"),
    ("train: grouped / fine-tuning", "train-step", "grouped", "finetune"),
    ("train: policy / fine-tuning", "train-step", "policy", "finetune"),
    ("train: grouped / split", "train-step", "grouped", "split"),
    ("train: split / fine-tuning", "train-step", "split", "finetune"),
    ("inference: grouped / plain+policy", "inference", "grouped", "plain+policy"),
    ("inference: grouped / split", "inference", "grouped", "split"),
    ("inference: split / plain+policy", "inference", "split", "plain+policy"),
    ("inference: grouped / dense", "inference", "grouped", "dense"),
    ("inference: policy / plain", "inference", "policy", "plain"),
]


def table(run):
    """{(model, size, batch): {(measure, impl): (median, targets)}}"""
    cells = defaultdict(dict)
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        cells[info["model"], info["size"], info["batch"]][info["measure"], info["impl"]] = (
            bench["stats"]["median"], info.get("targets", []))
    return cells


def ratio(row, measure, impl, other):
    if (measure, impl) not in row or (measure, other) not in row:
        return None, None
    median, targets = row[measure, impl]
    value = median / row[measure, other][0]
    limit = next((t["max_ratio"] for t in targets if t["vs"] == other), None)
    return value, limit


def render(run):
    cells = table(run)
    lines = ["| model | image | batch | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    missed = met = 0
    for (model, size, batch) in sorted(cells, key=lambda k: (k[0], k[1])):
        row = cells[model, size, batch]
        out = []
        for _, measure, impl, other in COLUMNS:
            value, limit = ratio(row, measure, impl, other)
            if value is None:
                out.append("-")
                continue
            text = f"{value:.2f}"
            if limit is not None:
                met += value <= limit
                missed += value > limit
                text += f" (≤ {limit:g}: {'met' if value <= limit else 'MISSED'})"
            out.append(text)
        lines.append(f"| {model} | {size}x{size} | {batch} | " + " | ".join(out) + " |")
    lines += ["", f"Targets: {met} met, {missed} missed."]
    return "\n".join(lines)


def plot(run, path):
    cells = table(run)
    models = sorted({k[0] for k in cells})
    fig = Figure(figsize=(4 * len(models), 3.4), layout="constrained")
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    for ax, model in zip(axes, models):
        keys = sorted((k for k in cells if k[0] == model), key=lambda k: k[1])
        for title, measure, impl, other in COLUMNS[:3]:
            points = [(str(k[1]), ratio(cells[k], measure, impl, other)[0]) for k in keys]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=title.removeprefix("train: "))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(title=model, xlabel="image size (px)", ylabel="training step, ratio of medians")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--out", help="write the markdown here instead of printing it")
    parser.add_argument("--figure", help="also draw the training-step ratios into this PNG")
    args = parser.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    text = render(run)
    if args.figure:
        plot(run, args.figure)
        text += f"\n\n![{os.path.basename(args.figure)}]({os.path.basename(args.figure)})"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
