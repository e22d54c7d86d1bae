"""Plots inference throughput against the routed fraction from a bench_models.py run (PNG, matplotlib Agg).

    python bench/plot.py bench/last_run.json --out bench/throughput_cpu.png [--batch N]

One panel per model; one line per execution (extra_info["impl"]) through the fixed fractions 0 ... 1;
the learned-policy case is drawn as a marker at the fraction its policy routed. Every point is
extra_info["images_per_s"] (batch / median time) of an inference benchmark. Without --batch each
model is drawn at the largest batch the run has for it.
"""
import argparse
import json
import os
from collections import defaultdict

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def throughput_points(run, batch=None):
    """{model: (batch, {impl: {"fixed": [(fraction, images/s)], "policy": (fraction, images/s) or None}})}."""
    rows = [b["extra_info"] for b in run["benchmarks"]
            if b["extra_info"].get("measure") == "inference" and "images_per_s" in b["extra_info"]]
    models = {}
    for model in sorted({r["model"] for r in rows}):
        batches = {r["batch"] for r in rows if r["model"] == model}
        chosen = batch if batch is not None else max(batches)
        if chosen not in batches:
            continue
        lines = defaultdict(lambda: {"fixed": [], "policy": None})
        for r in rows:
            if r["model"] != model or r["batch"] != chosen:
                continue
            point = (float(r["routed_fraction"]), r["images_per_s"])
            if r["fraction"] == "policy":
                lines[r["impl"]]["policy"] = point
            else:
                lines[r["impl"]]["fixed"].append(point)
        models[model] = (chosen, dict(lines))
    return models


def plot(run, out, batch=None):
    models = throughput_points(run, batch)
    if not models:
        raise ValueError("no inference benchmark with extra_info['images_per_s'] in this run (bench/bench_models.py)")
    fig = Figure(figsize=(5 * len(models), 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (model, (chosen, lines)) in enumerate(models.items()):
        ax = fig.add_subplot(1, len(models), i + 1)
        for impl in sorted(lines):
            fixed = sorted(lines[impl]["fixed"])
            color = None
            if fixed:
                (line,) = ax.plot(*zip(*fixed), marker="o", label=impl)
                color = line.get_color()
            if lines[impl]["policy"] is not None:
                ax.plot(*lines[impl]["policy"], marker="*", markersize=12, linestyle="none", color=color,
                        label=None if fixed else f"{impl} (policy)")
        ax.set(title=f"{model}, batch {chosen}", xlabel="fraction routed to the fine-tuned copy",
               ylabel="images / s (inference)", xlim=(-0.05, 1.05))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{run.get('machine_info', {}).get('cpu', {}).get('brand_raw', '')}  (star: learned policy)",
                 fontsize="small")
    fig.savefig(out, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output of bench/bench_models.py")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--batch", type=int, help="the batch size to draw (default: the largest per model)")
    args = parser.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    tmp = args.out + ".tmp.png"
    plot(run, tmp, args.batch)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
