"""The run directory: who may write into it, and every file a run leaves there.

A new run needs an empty or new --out; --resume continues a run in its own directory (--out must be the
one holding its last.pt); --overwrite deletes a previous run's directory (one holding args.json) first.
Only the main process writes, each file atomically, so a killed run leaves whole files of its last
finished epoch.
"""
import os
import shutil
from pathlib import Path

from .. import plots
from ..io import write_csv, write_json
from ..models import save_checkpoint
from .errors import UsageError
from .state import resume_path

ARGS_FILE = "args.json"  # written first: it marks a directory as a run's


def _listing(names, shown=4):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_run_dir(out, resume=None, overwrite=False, weights=None):
    """Refuses an --out that would mix or destroy another run's files (see the module's docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create or write it ({existing} is not a writable directory)")
    if resume and overwrite:
        raise UsageError("--overwrite starts a new run and --resume continues one: pass one of them")
    if resume:
        home = resume_path(resume).resolve().parent
        if home != out.resolve():
            raise UsageError(f"--resume continues the run in its own directory: pass --out {home}, not {out}")
        return
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise UsageError(f"--out {out} is not empty ({_listing(entries)}): pass --resume {out} to continue that run, "
                         f"--overwrite to replace it, or choose another --out")
    if ARGS_FILE not in entries:
        raise UsageError(f"--out {out} holds no {ARGS_FILE}, so it is not a run directory and --overwrite leaves it "
                         f"alone: remove it yourself or choose another --out")
    if weights and out.resolve() in Path(weights).resolve().parents:
        raise UsageError(f"--overwrite would delete --weights {weights}, which lies in --out {out}")


class RunOutputs:
    """Writes a run's files into its directory (nothing on processes other than the main one).

    args.json (the arguments), metrics.csv / metrics.json (per epoch), last.pt (each epoch, for --resume),
    best.pt (best on val), results.json (the final report), and for strategies with routed blocks the
    per-image test policies (test_policies.csv) and their plots (*.png); tensorboard/ with --tensorboard.
    """

    def __init__(self, out, main_process):
        self.dir = Path(out)
        self.main = main_process
        self.writer = None

    def start(self, args):
        """Claims the directory (after check_run_dir's rules) and writes args.json."""
        if not self.main:
            return
        check_run_dir(self.dir, args.resume, args.overwrite, args.weights)
        try:
            if args.overwrite and self.dir.is_dir():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / ARGS_FILE, vars(args))
        except OSError as err:  # e.g. a file system that refuses directories
            raise UsageError(f"--out {self.dir}: {err.strerror or err}") from None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def end_epoch(self, net, row, history, split_label, improved, training_state):
        """best.pt when the epoch improved on val, last.pt with the training state, the metrics so far."""
        if not self.main:
            return
        if improved:
            save_checkpoint(net, str(self.dir / "best.pt"), {"epoch": row["epoch"], "val_accuracy": row["val_accuracy"],
                                                             "train_split": split_label})
        save_checkpoint(net, str(self.dir / "last.pt"), training_state)
        write_csv(self.dir / "metrics.csv", history)
        write_json(self.dir / "metrics.json", {"train_split": split_label, "epochs": history})
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, float):
                    self.writer.add_scalar(key, value, row["epoch"])

    def finish(self, results, test, class_names, dataset_name, split_label):
        """results.json, with the per-image policies and their plots for routed models."""
        if not self.main:
            return
        if test["policies"].shape[1] > 0:
            results["outputs"].update(self.write_policies(test, class_names, dataset_name, split_label))
            results["test"]["block_usage"] = [float(u) for u in plots.block_usage(test["policies"])]
        write_json(self.dir / "results.json", results)
        if self.writer is not None:
            self.writer.add_scalar("test_accuracy", test["accuracy"], results["epochs"])
            self.writer.close()

    def write_policies(self, result, class_names, dataset_name, split_label):
        """Per-image test policies (CSV) and the block-usage figures; returns the written paths."""
        policies, labels = result["policies"], result["labels"]
        note = f"{dataset_name} test, {result['decisions']} decisions, trained on {split_label}"
        return {
            "policies_csv": str(plots.save_policies(self.dir / "test_policies.csv", policies, labels,
                                                    result["predictions"], class_names)),
            "block_usage_png": str(plots.plot_block_usage(self.dir / "block_usage.png", plots.block_usage(policies),
                                                          [dataset_name], title=f"Fine-tuned block usage\n{note}")),
            "finetuned_blocks_png": str(plots.plot_finetuned_histogram(self.dir / "finetuned_blocks.png", policies,
                                                                       title="Fine-tuned blocks per image")),
            "class_block_usage_png": str(plots.plot_class_block_usage(
                self.dir / "class_block_usage.png", policies, labels, class_names,
                title=f"Fine-tuned block usage per class\n{note}")),
        }
