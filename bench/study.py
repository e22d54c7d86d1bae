"""The accuracy study: SpotTune against the baselines of the paper's Table 2, on real offline data.

    python bench/study.py list                 # the grid: sources, targets, strategies, seeds, settings
    python bench/study.py tune  [--jobs 2]     # the learning-rate grid, seed 0, validation split only
    python bench/study.py run   [--jobs 2]     # every (source, target, strategy, seed) of the grid
    python bench/study.py diagnose [--jobs 2]  # SpotTune variants on one cell (what makes it win or lose)
    python bench/study.py long  [--jobs 2]     # SpotTune and fine-tuning trained 30 and 60 epochs, MobileNetV2
    python bench/study.py report               # bench/ACCURACY.md and its figures from the run files

Each run is one call of the reference trainer (`python -m spottune_ext.train ...`); its record lands in
bench/accuracy/{tune,runs,diagnose,long,long60}/<source>__<target>__<strategy>__s<seed>.json with the exact command
that reproduces it. A run whose record exists is skipped, so an interrupted study resumes where it
stopped. Settings are chosen on validation accuracy only: `tune` picks each (source, strategy)'s
learning rate on the tuning target with seed 0, `run` uses it everywhere; the test split is read
once per run, by the trainer, with the checkpoint selected on validation.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "accuracy"
REPORT = ROOT / "bench" / "ACCURACY.md"
sys.path.insert(0, str(ROOT))
from spottune_ext.train import recipes  # noqa: E402

TUNE_TARGET = "animal-mnist"
WEIGHTS = recipes.FASHION_RESNET.relative_to(ROOT)  # relative: the recorded commands run from any checkout

# The recipes' sources (spottune_ext/train/recipes.py), with the study's learning-rate grid, targets and seeds.
SOURCES = {
    "mnv2-imagenet": {**recipes.SOURCES["mnv2-imagenet"], "lr_grid": (0.001, 0.003, 0.01),
                      "targets": ("animal-mnist", "mnist-5k", "digits", "fashion-mnist"), "seeds": 5},
    "r26-fashion": {**recipes.SOURCES["r26-fashion"], "lr_grid": (0.001, 0.003, 0.01, 0.03, 0.1),
                    "targets": ("animal-mnist", "mnist-5k", "digits"), "seeds": 3},
}
STRATEGIES = recipes.STRATEGIES

# Diagnosis: SpotTune variants, each a change of one setting from the study's SpotTune, on one cell.
DIAGNOSE_SOURCE, DIAGNOSE_TARGET, DIAGNOSE_SEEDS = "mnv2-imagenet", "animal-mnist", 3
VARIANTS = {  # name: (strategy, trainer arguments changed from the study's)
    "spottune": ("spottune", []),
    "finetune": ("finetune", []),
    "feature_extractor": ("feature_extractor", []),
    "spottune+tau1": ("spottune", ["--tau", "1"]),
    "spottune+init-tuned-none": ("spottune", ["--policy-init-tuned", "none"]),
    "spottune+init-tuned-none+tau1": ("spottune", ["--policy-init-tuned", "none", "--tau", "1"]),
    "spottune+init-tuned-none+bn-running": ("spottune", ["--policy-init-tuned", "none", "--bn-stats", "running"]),
    "spottune+init-tuned-none+frozen-bn-train+dense": (
        "spottune", ["--policy-init-tuned", "none", "--frozen-bn", "train", "--execution", "dense"]),
}
# The search for a setting where SpotTune beats fine-tuning, from the default start: every variant is
# screened on seed 0, and those whose validation accuracy there reaches their strategy's as the study runs it
# (the part of the name before "+") get every seed.
SEARCH = {
    "spottune+init-tuned-0.7": ("spottune", ["--policy-init-tuned", "0.7"]),
    "spottune+policy-lr-0.001": ("spottune", ["--policy-lr", "0.001"]),
    "spottune+policy-lr-0.1": ("spottune", ["--policy-lr", "0.1"]),
    "spottune+bn-running": ("spottune", ["--bn-stats", "running"]),
    "spottune+frozen-bn-train": ("spottune", ["--frozen-bn", "train"]),
    "spottune+eval-sample": ("spottune", ["--eval-sample"]),
    "spottune+lr-0.003": ("spottune", ["--lr", "0.003"]),
    "spottune+epochs-30": ("spottune", ["--epochs", "30"]),
    "finetune+epochs-30": ("finetune", ["--epochs", "30"]),
    # SpotTune's validation accuracy still rises at 30 epochs on some targets; fine-tuning's has levelled off.
    "spottune+epochs-60": ("spottune", ["--epochs", "60"]),
    "finetune+epochs-60": ("finetune", ["--epochs", "60"]),
    # The policy network's size: the paper's widths, and a quarter-resolution input.
    "spottune+paper-policy": ("spottune", ["--policy-widths", "64", "128", "256", "512"]),
    "spottune+policy-input-16": ("spottune", ["--policy-input-size", "16"]),
    "spottune+policy-16-32-half": (
        "spottune", ["--policy-widths", "16", "32", "--policy-stem-width", "16", "--policy-input-size", "16"]),
    # Global-k: a start at k of the L blocks fine-tuned (3 of 17) instead of 0.9 of them.
    "global_k+init-tuned-0.18": ("global_k", ["--policy-init-tuned", "0.18"]),
}

# Longer training: SpotTune and fine-tuning at 2x and 4x the epochs on every MobileNetV2 target (the search
# found SpotTune's validation accuracy still rising after 15 epochs, and again after 30). Records per length
# in their own folder; the search's runs of the same command are reused.
LONG_SOURCE, LONG_STRATEGIES = "mnv2-imagenet", ("spottune", "finetune")
LONG = {30: "long", 60: "long60"}  # epochs: folder

# A handful of images and one epoch: checks the plumbing (`make test`), not the numbers.
TINY = {"images_per_class": 3, "eval_per_class": 2, "epochs": 1, "batch": 6, "lr_grid": {"r26-fashion": (0.01,)},
        "sources": {"r26-fashion": ("digits",)}, "strategies": ("spottune", "finetune", "global_k"), "seeds": 1}


def settings(tiny):
    if tiny:
        return {**TINY}
    return {"images_per_class": recipes.IMAGES_PER_CLASS, "eval_per_class": recipes.EVAL_PER_CLASS,
            "epochs": recipes.EPOCHS, "batch": recipes.BATCH,
            "lr_grid": {k: v["lr_grid"] for k, v in SOURCES.items()},
            "sources": {k: v["targets"] for k, v in SOURCES.items()},
            "strategies": tuple(STRATEGIES), "seeds": None}


def record_name(source, target, strategy, seed):
    return f"{source}__{target}__{strategy}__s{seed}.json"


def command(source, target, strategy, seed, lr, cfg, out_dir, threads):
    """The trainer's command line for one run."""
    args = recipes.arguments(source, strategy, target, lr, seed, WEIGHTS, cfg["images_per_class"],
                             cfg["eval_per_class"], cfg["epochs"], cfg["batch"])
    return [sys.executable, "-m", "spottune_ext.train", *args, "--threads", str(threads), "--no-progress",
            "--out", str(out_dir)]


def with_overrides(cmd, extra):
    """cmd with the flags in `extra` replacing the same flags (a flag's values run to the next flag)."""
    flags = {}
    i = 0
    while i < len(extra):
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        flags[extra[i]] = extra[i + 1:j]
        i = j
    out, i = [], 0
    while i < len(cmd):
        j = i + 1
        while j < len(cmd) and not cmd[j].startswith("--"):
            j += 1
        if cmd[i] not in flags:
            out += cmd[i:j]
        i = j
    for flag, values in flags.items():
        out += [flag, *values]
    return out


def run_one(job):
    """Runs the trainer for one job unless its record exists; returns the record's path."""
    path, cmd, meta = job["path"], job["cmd"], job["meta"]
    if path.exists():
        return path
    scratch = Path(cmd[cmd.index("--out") + 1])
    shutil.rmtree(scratch, ignore_errors=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"run {path.name} failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n{tail}")
    results = json.loads((scratch / "results.json").read_text())
    history = json.loads((scratch / "metrics.json").read_text())["epochs"]
    record = {
        **meta,
        "val_accuracy": results["val"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"],
        "epochs": results["epochs"], "selected_epoch": results["selected_epoch"],
        "images_per_class": job["cfg"]["images_per_class"], "images": results["images"],
        "train_time_s": results["train_time_s"], "wall_time_s": time.perf_counter() - start,
        "block_usage": results["test"].get("block_usage"),
        "exported": results.get("exported"),
        "val_curve": [row["val_accuracy"] for row in history],
        "train_curve": [row["train_accuracy"] for row in history],
        "command": shlex.join(["python", *cmd[1:]]),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def execute(jobs, n_jobs):
    pending = [j for j in jobs if not j["path"].exists()]
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} done, {len(pending)} to run", flush=True)
    for job in pending:
        job["path"].parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        for job, future in [(j, pool.submit(run_one, j)) for j in pending]:
            try:
                future.result()
                rec = json.loads(job["path"].read_text())
                print(f"{job['path'].name}: val {rec['val_accuracy']:.3f} test {rec['test_accuracy']:.3f} "
                      f"({rec['wall_time_s']:.0f} s)", flush=True)
            except RuntimeError as err:
                failures.append(str(err))
                print(err, file=sys.stderr, flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed")


def load(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def chosen_lrs(out, cfg):
    """(source, strategy) -> the learning rate with the best validation accuracy on the tuning runs."""
    best = {}
    for rec in load(out / "tune"):
        key = (rec["source"], rec["strategy"])
        if key not in best or rec["val_accuracy"] > best[key][1]:
            best[key] = (rec["lr"], rec["val_accuracy"])
    return {key: lr for key, (lr, _) in best.items()}


def tune_jobs(out, cfg, threads):
    jobs = []
    for source, targets in cfg["sources"].items():
        target = TUNE_TARGET if TUNE_TARGET in targets else targets[0]
        for strategy in cfg["strategies"]:
            for lr in cfg["lr_grid"][source]:
                name = f"{strategy}@lr{lr:g}"
                path = out / "tune" / record_name(source, target, name, 0)
                cmd = command(source, target, strategy, 0, lr, cfg, out / "scratch" / path.stem, threads)
                meta = {"source": source, "target": target, "strategy": strategy, "seed": 0, "lr": lr}
                jobs.append({"path": path, "cmd": cmd, "meta": meta, "cfg": cfg})
    return jobs


def grid_jobs(out, cfg, threads):
    lrs = chosen_lrs(out, cfg)
    jobs = []
    for source, targets in cfg["sources"].items():
        seeds = cfg["seeds"] or SOURCES[source]["seeds"]
        for seed in range(seeds):  # seed-major: every cell gets its first seeds before any gets its last
            for target in targets:
                for strategy in cfg["strategies"]:
                    if (source, strategy) not in lrs:
                        raise SystemExit(f"no tuning run for {source} / {strategy}: run `study.py tune` first")
                    lr = lrs[source, strategy]
                    path = out / "runs" / record_name(source, target, strategy, seed)
                    cmd = command(source, target, strategy, seed, lr, cfg,
                                  out / "scratch" / path.stem, threads)
                    meta = {"source": source, "target": target, "strategy": strategy, "seed": seed, "lr": lr}
                    jobs.append({"path": path, "cmd": cmd, "meta": meta, "cfg": cfg})
    # SpotTune, fine-tuning and the feature extractor get every seed before the other strategies
    main_three = tuple(STRATEGIES)[:3]
    jobs.sort(key=lambda j: (j["meta"]["strategy"] not in main_three, j["meta"]["seed"]))
    return jobs


def long_jobs(out, cfg, threads):
    lrs = chosen_lrs(out, cfg)
    jobs = []
    for epochs, folder in LONG.items():
        for seed in range(cfg["seeds"] or SOURCES[LONG_SOURCE]["seeds"]):
            for target in cfg["sources"].get(LONG_SOURCE, ()):
                for strategy in LONG_STRATEGIES:
                    path = out / folder / record_name(LONG_SOURCE, target, strategy, seed)
                    cmd = command(LONG_SOURCE, target, strategy, seed, lrs[LONG_SOURCE, strategy], cfg,
                                  out / "scratch" / f"{folder}-{path.stem}", threads)
                    meta = {"source": LONG_SOURCE, "target": target, "strategy": strategy, "seed": seed,
                            "lr": lrs[LONG_SOURCE, strategy]}
                    twin = out / "diagnose" / record_name(LONG_SOURCE, target, f"{strategy}+epochs-{epochs}", seed)
                    if not path.exists() and twin.exists() and target == DIAGNOSE_TARGET:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps({**json.loads(twin.read_text()), **meta}, indent=1))
                    jobs.append({"path": path, "cmd": with_overrides(cmd, ["--epochs", str(epochs)]), "meta": meta,
                                 "cfg": cfg})
    return jobs


def diagnose_jobs(out, cfg, threads, variants, seeds):
    lrs = chosen_lrs(out, cfg)
    jobs = []
    for seed in seeds:
        for name, (strategy, extra) in variants.items():
            lr = lrs.get((DIAGNOSE_SOURCE, strategy))
            if lr is None:
                raise SystemExit(f"no tuning run for {DIAGNOSE_SOURCE} / {strategy}: run `study.py tune` first")
            path = out / "diagnose" / record_name(DIAGNOSE_SOURCE, DIAGNOSE_TARGET, name, seed)
            cmd = command(DIAGNOSE_SOURCE, DIAGNOSE_TARGET, strategy, seed, lr, cfg,
                          out / "scratch" / path.stem, threads)
            meta = {"source": DIAGNOSE_SOURCE, "target": DIAGNOSE_TARGET, "strategy": name, "seed": seed, "lr": lr}
            jobs.append({"path": path, "cmd": with_overrides(cmd, extra), "meta": meta, "cfg": cfg})
    return jobs


def promoted(out):
    """The search variants whose seed-0 validation accuracy reaches their strategy's as the study runs it."""
    def val(name, folder="diagnose"):
        path = out / folder / record_name(DIAGNOSE_SOURCE, DIAGNOSE_TARGET, name, 0)
        return json.loads(path.read_text())["val_accuracy"]
    return {name: variant for name, variant in SEARCH.items()
            if val(name) >= val(name.split("+")[0], "diagnose" if name.split("+")[0] in VARIANTS else "runs")}


def diagnose(out, cfg, threads, n_jobs):
    seeds = range(DIAGNOSE_SEEDS)
    execute(diagnose_jobs(out, cfg, threads, VARIANTS, seeds) + diagnose_jobs(out, cfg, threads, SEARCH, [0]), n_jobs)
    chosen = promoted(out)
    print(f"search variants with every seed: {', '.join(chosen) or 'none'}", flush=True)
    execute(diagnose_jobs(out, cfg, threads, chosen, seeds[1:]), n_jobs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("list", "tune", "run", "diagnose", "long", "report"))
    p.add_argument("--out", type=Path, default=OUT, help="folder of the run records")
    p.add_argument("--report", type=Path, default=REPORT, help="the generated report (report)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--tiny", action="store_true", help="a few images, one epoch: checks the plumbing only")
    args = p.parse_args(argv)
    cfg = settings(args.tiny)
    if args.action == "list":
        for source, targets in cfg["sources"].items():
            seeds = cfg["seeds"] or SOURCES[source]["seeds"]
            print(f"{source}: {SOURCES[source]['title']}; targets {', '.join(targets)}; {seeds} seeds; learning "
                  f"rates {cfg['lr_grid'][source]}")
        print(f"strategies: {', '.join(cfg['strategies'])}")
        print(f"{cfg['images_per_class']} training images per class, {cfg['eval_per_class']} per class in val and "
              f"test, {cfg['epochs']} epochs, batch {cfg['batch']}; each (source, strategy)'s learning rate chosen on "
              f"{TUNE_TARGET}'s validation split, seed 0")
        print(f"diagnosis: {DIAGNOSE_SOURCE} -> {DIAGNOSE_TARGET}, {DIAGNOSE_SEEDS} seeds: {', '.join(VARIANTS)}")
        print(f"search (seed 0; {DIAGNOSE_SEEDS} seeds where validation reaches the strategy's own): {', '.join(SEARCH)}")
        print(f"long: {', '.join(LONG_STRATEGIES)} at {' and '.join(map(str, LONG))} epochs on every {LONG_SOURCE} "
              f"target")
        return
    if args.action == "report":
        from report_accuracy import write_report
        write_report(args.out, args.report, cfg)
        return
    if args.action == "diagnose":
        diagnose(args.out, cfg, args.threads, args.jobs)
    else:
        execute({"tune": tune_jobs, "run": grid_jobs, "long": long_jobs}[args.action](args.out, cfg, args.threads),
                args.jobs)
    shutil.rmtree(args.out / "scratch", ignore_errors=True)


if __name__ == "__main__":
    main()
