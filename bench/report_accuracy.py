"""bench/ACCURACY.md and its figures from the accuracy study's run records (bench/study.py report)."""
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spottune_ext.metrics import mean_interval  # noqa: E402

BASELINE = "finetune"


def fmt(mean, half, scale=100):
    if math.isnan(half):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * half:.1f}"


def cells(records):
    """{(source, target): {strategy: {seed: record}}}"""
    out = {}
    for rec in records:
        out.setdefault((rec["source"], rec["target"]), {}).setdefault(rec["strategy"], {})[rec["seed"]] = rec
    return out


def accuracy(rec):
    """The reported test accuracy: the exported plain network's for strategies that ship one."""
    return rec["exported"]["test_accuracy"] if rec.get("exported") else rec["test_accuracy"]


def paired(cell, strategy, baseline=BASELINE):
    """Per-seed differences strategy - baseline of test accuracy, over the seeds both have."""
    seeds = sorted(set(cell.get(strategy, {})) & set(cell.get(baseline, {})))
    return [accuracy(cell[strategy][s]) - accuracy(cell[baseline][s]) for s in seeds]


def verdict(diffs):
    if len(diffs) < 2:
        return "too few seeds"
    mean, half = mean_interval(diffs)
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "within noise"


def strategy_table(grid, strategies):
    lines = ["| source | target | " + " | ".join(strategies) + " | SpotTune − fine-tuning (paired) |",
             "|" + "---|" * (len(strategies) + 3)]
    for (source, target), cell in sorted(grid.items()):
        row = []
        for s in strategies:
            values = [accuracy(r) for r in cell.get(s, {}).values()]
            row.append(f"{fmt(*mean_interval(values))} (n={len(values)})" if values else "-")
        diffs = paired(cell, "spottune")
        diff = f"{fmt(*mean_interval(diffs))}: {verdict(diffs)}" if diffs else "-"
        lines.append(f"| {source} | {target} | " + " | ".join(row) + f" | {diff} |")
    return lines


def usage_table(grid):
    lines = ["| source | target | fraction of block uses fine-tuned (test, argmax), mean over seeds |", "|---|---|---|"]
    for (source, target), cell in sorted(grid.items()):
        usages = [r["block_usage"] for r in cell.get("spottune", {}).values() if r.get("block_usage")]
        if usages:
            per_block = [statistics.fmean(u[i] for u in usages) for i in range(len(usages[0]))]
            text = f"{statistics.fmean(per_block):.2f} (per block: {' '.join(f'{u:.2f}' for u in per_block)})"
            lines.append(f"| {source} | {target} | {text} |")
    return lines


def plot_cells(grid, strategies, path):
    keys = sorted(grid)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.6), sharey=False, squeeze=False)
    for ax, key in zip(axes[0], keys):
        cell = grid[key]
        for i, s in enumerate(strategies):
            values = [accuracy(r) for r in cell.get(s, {}).values()]
            if not values:
                continue
            mean, half = mean_interval(values)
            ax.bar(i, 100 * mean, yerr=None if math.isnan(half) else 100 * half, capsize=2,
                   color="C3" if s == "spottune" else ("C0" if s == BASELINE else "0.7"))
        ax.set_xticks(range(len(strategies)), strategies, rotation=70, fontsize=7)
        ax.set_title(f"{key[0]}\n→ {key[1]}", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        lows = [100 * accuracy(r) for s in strategies for r in cell.get(s, {}).values()]
        if lows:
            ax.set_ylim(max(0, min(lows) - 10), min(100, max(lows) + 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(records, path, strategies=("spottune", "finetune", "feature_extractor")):
    """Validation accuracy per epoch, seed 0, for each cell: has it stopped rising?"""
    grid = cells(records)
    keys = sorted(grid)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for s in strategies:
            rec = grid[key].get(s, {}).get(0)
            if rec:
                ax.plot(range(1, len(rec["val_curve"]) + 1), [100 * v for v in rec["val_curve"]], label=s)
        ax.set_title(f"{key[0]} → {key[1]}", fontsize=7)
        ax.set_xlabel("epoch", fontsize=7)
    axes[0][0].set_ylabel("val accuracy (%)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: Path, cfg):
    from study import LONG, SEARCH, STRATEGIES, VARIANTS, chosen_lrs

    runs, diagnose = out / "runs", out / "diagnose"
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    grid = cells(records)
    strategies = [s for s in STRATEGIES if any(s in c for c in grid.values())]
    figures = report.parent / "accuracy"
    figures.mkdir(parents=True, exist_ok=True)
    lines = ["# Accuracy study", "",
             "Generated by `make accuracy` (`bench/study.py`, `bench/report_accuracy.py`) from the run records in",
             "`bench/accuracy/runs/`; each record holds the command that reproduces it.", ""]
    lines += [f"Settings: {cfg['images_per_class']} training images per class, {cfg['eval_per_class']} per class in "
              f"validation and test, {cfg['epochs']} epochs, batch {cfg['batch']}, SGD momentum 0.9, the trainer's "
              f"defaults otherwise; each (source, strategy)'s learning rate chosen from "
              f"{' / '.join(f'{k}: {v}' for k, v in cfg['lr_grid'].items())} on validation accuracy, seed 0, "
              f"on the tuning target. Test accuracy in %, mean ± "
              f"half-width of the 95% t-interval over seeds. Global-k and SpotTune-tuned-only are reported as the "
              f"plain network export_global() makes.", ""]
    lrs = chosen_lrs(out, cfg)
    if lrs:
        lines += ["Chosen learning rates: " + "; ".join(f"{src}/{s}: {lr:g}" for (src, s), lr in sorted(lrs.items())),
                  ""]
    if records:
        plot_cells(grid, strategies, figures / "accuracy.png")
        plot_curves(records, figures / "curves.png")
        lines += ["## Test accuracy", ""] + strategy_table(grid, strategies) + ["",
                  "![test accuracy per cell](accuracy/accuracy.png)", "",
                  "\"better\" / \"worse\" only where the paired 95% interval of SpotTune − fine-tuning "
                  "excludes zero.", "",
                  "## SpotTune's routing", ""] + usage_table(grid) + ["",
                  "## Validation curves (seed 0)", "", "![validation accuracy per epoch](accuracy/curves.png)", ""]
    for epochs, folder in LONG.items():
        long_records = [json.loads(p.read_text()) for p in sorted((out / folder).glob("*.json"))]
        if not long_records:
            continue
        long_grid = cells(long_records)
        figure = f"curves_{folder}.png"
        plot_curves(long_records, figures / figure, strategies=("spottune", "finetune"))
        lines += [f"## Trained longer ({epochs} epochs)", "",
                  f"SpotTune and fine-tuning as in the table above, {epochs} epochs instead of "
                  f"{cfg['epochs']}, the same learning rates; test accuracy (%).", ""]
        lines += strategy_table(long_grid, ["spottune", "finetune"]) + ["", ""] + usage_table(long_grid) + [
            "", f"![validation accuracy per epoch](accuracy/{figure})", ""]
    diag = [json.loads(p.read_text()) for p in sorted(diagnose.glob("*.json"))] if diagnose.is_dir() else []
    if diag:
        by_variant = {}
        for rec in diag:
            by_variant.setdefault(rec["strategy"], {})[rec["seed"]] = rec
        base = by_variant.get("spottune", {})
        src, tgt = diag[0]["source"], diag[0]["target"]
        lines += ["## Diagnosis", "", f"SpotTune variants on {src} → {tgt}, one setting changed at a time, "
                  "with fine-tuning and the feature extractor for reference; validation and test accuracy (%), and "
                  "the paired difference of test accuracy to the study's SpotTune. Below the line, the search: "
                  "each variant on seed 0, and on every seed where its validation accuracy there reached its "
                  "strategy's.",
                  "", "| variant | n | val | test | test − SpotTune (paired) | fine-tuned block uses |",
                  "|---|---|---|---|---|---|"]
        for name in [*VARIANTS, None, *SEARCH]:
            if name is None:
                lines.append("| *search* | | | | | |")
                continue
            recs = by_variant.get(name)
            if not recs:
                continue
            vals = [r["val_accuracy"] for r in recs.values()]
            tests = [r["test_accuracy"] for r in recs.values()]
            seeds = sorted(set(recs) & set(base))
            diffs = [recs[s]["test_accuracy"] - base[s]["test_accuracy"] for s in seeds]
            usage = [statistics.fmean(r["block_usage"]) for r in recs.values() if r.get("block_usage")]
            diff = fmt(*mean_interval(diffs)) if name != "spottune" and diffs else "-"
            usage_text = f"{statistics.fmean(usage):.2f}" if usage else "-"
            lines.append(f"| {name} | {len(recs)} | {fmt(*mean_interval(vals))} | {fmt(*mean_interval(tests))} | {diff} | "
                         f"{usage_text} |")
        lines.append("")
    notes = report.parent / "ACCURACY_notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    report.write_text("\n".join(lines))
    print(f"wrote {report}")
