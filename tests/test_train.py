"""The reference trainer on tiny data and models: every strategy end to end, honest splits, the lr
schedule, resume after a kill, DDP with two processes, and every bad-input path."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spottune_ext import train
from spottune_ext.models import STRATEGIES, DecathlonResNet, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}

# A ResNet-26-like backbone of three 1-block stages (widths 8/16/16) on 16x16 digits: seconds per run.
TINY_MODEL = ["--arch", "resnet26", "--widths", "8", "16", "16", "--layers", "1", "1", "1", "--stem-width", "8"]
TINY_DATA = ["--data", "digits", "--image-size", "16", "--max-per-class", "6", "--max-eval-per-class", "2",
             "--batch-size", "16", "--max-train-batches", "2"]
POLICY = ["--policy-widths", "32"]
FAST = ["--threads", "1", "--no-progress"]


def tiny_argv(out, strategy="spottune", *extra):
    policy = POLICY if STRATEGIES[strategy].uses_policy else []
    return TINY_MODEL + TINY_DATA + FAST + ["--strategy", strategy, "--out", str(out)] + policy + list(extra)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "spottune_ext.train", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def initial_model(argv):
    """The model a run starts from (same seed, same construction as the trainer's; the run is done, so its
    directory is not checked)."""
    args = train.build_parser().parse_args(argv)
    train.state.seed_everything(args.seed)
    backbone, _ = train.build_backbone(args)
    return train.build_model(args, backbone, 10)


def is_png(path):
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_selects_on_val_and_tests(tmp_path, strategy):
    # finetune_last_k: the last block; random_policy: the last block tuned, the other two routed at random.
    extra = {"finetune_last_k": ["--strategy-opt", "k=1"], "random_policy": ["--strategy-opt", "last=1"]}.get(strategy, [])
    argv = tiny_argv(tmp_path, strategy, "--epochs", "2", "--lr", "0.05", *extra)
    results = train.run(train.parse_args(argv))

    assert results["train_split"] == "train" and results["images"] == {"train": 60, "val": 20, "test": 20}
    assert results["selection"].startswith("best validation accuracy")
    assert results["test"]["images"] == 20 and 0 <= results["test"]["accuracy"] <= 1
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["train_split"] == "train" for r in rows)
    best_epoch = max(range(2), key=lambda i: (float(rows[i]["val_accuracy"]), -i)) + 1
    assert results["selected_epoch"] == best_epoch
    assert json.loads((tmp_path / "results.json").read_text())["test"]["accuracy"] == results["test"]["accuracy"]

    # Exactly the strategy's trainable parameters moved; the frozen ones kept their initial values.
    start = initial_model(argv)
    trained, extra_state = load_checkpoint(str(tmp_path / "last.pt"))
    assert extra_state["epoch"] == 2
    moved = {name: not torch.equal(p, trained.state_dict()[name]) for name, p in start.named_parameters()}
    trainable = {name for name, p in start.named_parameters() if p.requires_grad}
    assert all(not moved[name] for name in moved if name not in trainable), strategy
    assert any(moved[name] for name in trainable)
    counts = results["parameters"]
    assert counts["trainable"] == sum(p.numel() for p in start.parameters() if p.requires_grad) <= counts["total"]

    # Routed strategies: per-image test policies and their plots.
    if start.num_routed:
        with open(tmp_path / "test_policies.csv", newline="") as f:
            policies = list(csv.reader(f))
        assert len(policies) == 1 + 20 and policies[0][-1] == f"block_{start.num_routed}"
        for key in ("block_usage_png", "finetuned_blocks_png", "class_block_usage_png"):
            assert is_png(results["outputs"][key])
        expected = {"spottune": "argmax", "global_k": "argmax", "spottune_tuned_only": "all_tuned",
                    "random_policy": "random"}[strategy]
        assert results["eval_decisions"] == expected
    else:
        assert not (tmp_path / "block_usage.png").exists() and results["eval_decisions"] == "fixed"


def test_eval_sample_is_reported(tmp_path):
    results = train.run(train.parse_args(tiny_argv(tmp_path, "spottune", "--epochs", "1", "--eval-sample")))
    assert results["eval_decisions"] == results["val"]["decisions"] == results["test"]["decisions"] == "sample"
    assert read_csv(tmp_path / "metrics.csv")[0]["val_decisions"] == "sample"


def test_model_options_reach_the_checkpoint(tmp_path):
    results = train.run(train.parse_args(tiny_argv(tmp_path, "spottune", "--epochs", "1", "--adaptive-blocks", "1", "2",
                                                   "--execution", "dense", "--frozen-bn", "train", "--tau", "2",
                                                   "--policy-input-size", "8", "--workers", "1")))
    config = torch.load(tmp_path / "best.pt", weights_only=True)["config"]
    assert config["adaptive_blocks"] == [1, 2] and config["execution"] == "dense" and config["frozen_bn"] == "train"
    assert config["policy"]["tau"] == 2 and config["policy"]["input_size"] == 8
    assert len(results["test"]["block_usage"]) == 2


def test_train_on_trainval_is_explicit_and_labelled(tmp_path):
    results = train.run(train.parse_args(tiny_argv(tmp_path, "finetune", "--epochs", "2", "--train-on-trainval")))
    assert results["train_split"] == "train+val" and results["val"] is None
    assert results["images"] == {"train": 80, "val": 0, "test": 20}
    assert results["selection"].startswith("last epoch") and results["selected_epoch"] == 2
    rows = read_csv(tmp_path / "metrics.csv")
    assert all(r["train_split"] == "train+val" and r["val_accuracy"] == "" for r in rows)
    assert json.loads((tmp_path / "metrics.json").read_text())["train_split"] == "train+val"
    # The reported checkpoint is the last one, never one chosen on data it trained on.
    assert results["outputs"]["checkpoint"].endswith("last.pt") and not (tmp_path / "best.pt").exists()


def test_lr_schedule_decays_at_every_step():
    net = torch.nn.Linear(2, 2)
    policy = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": net.parameters(), "lr": 0.1},
                                 {"params": policy.parameters(), "lr": 0.01}], lr=0.1, momentum=0.9)
    scheduler = train.make_scheduler(optimizer, [40, 60, 80], 0.1)
    seen = []
    for epoch in range(100):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for epoch, expected in ((0, 0.1), (39, 0.1), (40, 0.01), (59, 0.01), (60, 1e-3), (79, 1e-3), (80, 1e-4), (99, 1e-4)):
        assert seen[epoch][0] == pytest.approx(expected, rel=1e-9), epoch
        assert seen[epoch][1] == pytest.approx(expected / 10, rel=1e-9), epoch
    with pytest.raises(train.UsageError, match="increasing"):
        train.make_scheduler(optimizer, [60, 40], 0.1)


def test_trainer_applies_the_schedule_to_both_groups(tmp_path):
    train.run(train.parse_args(tiny_argv(tmp_path, "spottune", "--epochs", "3", "--lr", "0.1", "--policy-lr", "0.01",
                                         "--lr-steps", "1", "2", "--lr-gamma", "0.5")))
    rows = read_csv(tmp_path / "metrics.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.05, 0.025])
    assert [float(r["policy_lr"]) for r in rows] == pytest.approx([0.01, 0.005, 0.0025])


def test_weights_from_checkpoint_and_state_dict(tmp_path):
    backbone = DecathlonResNet(7, (1, 1, 1), (8, 16, 16), 8)
    save_checkpoint(backbone, str(tmp_path / "source.pt"))
    torch.save(backbone.state_dict(), tmp_path / "source_state.pt")
    data = TINY_DATA + FAST + ["--strategy", "feature_extractor", "--epochs", "1"]

    # A backbone checkpoint carries its architecture; its 7-class head gives way to the 10 digits.
    results = train.run(train.parse_args(data + ["--weights", str(tmp_path / "source.pt"), "--out",
                                                 str(tmp_path / "a")]))
    assert results["arch"] == "resnet26" and results["num_classes"] == 10
    trained, _ = load_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert torch.equal(trained.backbone.conv1.weight, backbone.conv1.weight)
    # A plain state dict needs the architecture from --arch.
    train.run(train.parse_args(TINY_MODEL + data + ["--weights", str(tmp_path / "source_state.pt"), "--out",
                                                    str(tmp_path / "b")]))
    trained, _ = load_checkpoint(str(tmp_path / "b" / "best.pt"))
    assert torch.equal(trained.backbone.layer3[0].conv2.weight, backbone.layer3[0].conv2.weight)


def _history(path):
    return [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in read_csv(path)]


def test_resume_after_kill_reaches_the_same_result(tmp_path):
    argv = tiny_argv("OUT", "spottune", "--epochs", "3", "--max-train-batches", "3", "--lr", "0.05")

    def with_out(out):
        return [str(out) if a == "OUT" else a for a in argv]

    full = cli(*with_out(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "spottune_ext.train", *with_out(killed)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "results.json").exists()
    _, extra = load_checkpoint(str(killed / "last.pt"))
    assert 1 <= extra["epoch"] < 3

    resumed = cli(*with_out(killed), "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed} after epoch {extra['epoch']}" in resumed.stdout

    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for key in ("test", "val"):
        a[key].pop("images_per_s", None)
        b[key].pop("images_per_s", None)
        assert a[key] == b[key]
    assert a["selected_epoch"] == b["selected_epoch"] and a["replica_weights_sha256"] == b["replica_weights_sha256"]
    assert _history(tmp_path / "full" / "metrics.csv") == _history(killed / "metrics.csv")
    for name in ("last.pt", "best.pt"):
        sa, sb = (torch.load(d / name, weights_only=True)["state_dict"] for d in (tmp_path / "full", killed))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_ddp_two_processes_stay_in_step_and_learn(tmp_path):
    argv = tiny_argv(tmp_path, "spottune", "--epochs", "3", "--max-per-class", "16", "--max-train-batches", "4",
                     "--batch-size", "8", "--lr", "0.05")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "spottune_ext.train", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    hashes = results["replica_weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    rows = read_csv(tmp_path / "metrics.csv")
    # 2 processes x 4 batches x 8 images per epoch, each process on its own half of the data.
    assert [int(r["train_images"]) for r in rows] == [64] * 3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert results["test"]["images"] == 20  # evaluation split over the processes, gathered whole
    assert proc.stdout.count("epoch 1/3:") == 1  # only rank 0 logs


# ---------------------------------------------------------------------------------------- bad input

def error_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "spottune-train: error:" in err
    return err


def test_missing_and_empty_data_directories(tmp_path, capsys):
    err = error_of(tiny_argv(tmp_path / "o", "finetune", "--data", str(tmp_path / "nowhere")), capsys)
    assert "no such directory" in err
    (tmp_path / "empty").mkdir()
    err = error_of(tiny_argv(tmp_path / "o", "finetune", "--data", str(tmp_path / "empty")), capsys)
    assert "is empty" in err


def test_unknown_strategy_and_arch(tmp_path, capsys):
    err = error_of(TINY_DATA + ["--arch", "resnet26", "--strategy", "magic"], capsys)
    assert "invalid choice: 'magic'" in err
    err = error_of(TINY_DATA + ["--arch", "vgg16"], capsys)
    assert "invalid choice: 'vgg16'" in err


def test_image_size_the_network_cannot_take(tmp_path, capsys):
    err = error_of(tiny_argv(tmp_path, "finetune", "--image-size", "4"), capsys)
    assert "--image-size 4 is too small for resnet26: it downsamples by 8" in err
    err = error_of(tiny_argv(tmp_path, "spottune", "--policy-input-size", "1"), capsys)
    assert "policy network downsamples by 2" in err


def test_resume_from_another_architecture(tmp_path, capsys):
    train.run(train.parse_args(tiny_argv(tmp_path / "a", "finetune", "--epochs", "1")))
    other = [a if a != "16" else "24" for a in TINY_MODEL]  # widths 8 24 24
    argv = other + TINY_DATA + FAST + ["--strategy", "finetune", "--out", str(tmp_path / "a"),
                                       "--resume", str(tmp_path / "a")]
    err = error_of(argv, capsys)
    assert "holds a different model" in err
    err = error_of(tiny_argv(tmp_path / "b", "finetune", "--resume", str(tmp_path / "nothing")), capsys)
    assert "no checkpoint at" in err
    err = error_of(tiny_argv(tmp_path / "a", "finetune", "--resume", str(tmp_path / "a"), "--train-on-trainval"),
                   capsys)
    assert "trained on train, this one on train+val" in err
    err = error_of(tiny_argv(tmp_path / "a", "finetune", "--resume", str(tmp_path / "a"), "--lr", "0.5"), capsys)
    assert "arguments differ from the run it continues (now, then): {'lr': (0.5, 0.01)}" in err
    err = error_of(tiny_argv(tmp_path / "a", "finetune", "--resume", str(tmp_path / "a" / "best.pt")), capsys)
    assert "not a last.pt training checkpoint" in err


def test_other_bad_arguments(tmp_path, capsys):
    save_checkpoint(DecathlonResNet(7, (1, 1, 1), (8, 16, 16), 8), str(tmp_path / "w.pt"))
    out = tmp_path / "out"
    data = TINY_DATA + ["--out", str(out)]
    cases = [
        (tiny_argv(out, "finetune", "--global-k", "2"), "--global-k, --lambda1 and --lambda2 go with"),
        (tiny_argv(out, "finetune", "--tau", "2"), "has no learned policy"),
        (tiny_argv(out, "finetune", "--epochs", "0"), "argument --epochs: expected an integer >= 1, got '0'"),
        (tiny_argv(out, "finetune", "--lr-steps", "5", "2"), "--lr-steps must be increasing"),
        (tiny_argv(out, "finetune_last_k", "--strategy-opt", "k=9"), "k=9 but only 3 adaptive blocks"),
        (data + ["--weights", str(tmp_path / "w.pt"), "--weights-sha256", "00ff"],
         "does not start with --weights-sha256 00ff"),
        (data + ["--weights", str(tmp_path / "w.pt"), "--arch", "resnet18"], "holds a resnet26, not the --arch"),
        (data + ["--arch", "resnet18", "--weights", str(tmp_path / "missing.pt")], "does not exist"),
        (data + ["--strategy", "finetune"], "--arch is required"),
    ]
    for argv, message in cases:
        assert message in error_of(argv, capsys), argv
    assert not out.exists()  # nothing written for bad input


def test_command_line_error_has_no_traceback(tmp_path):
    proc = cli(*tiny_argv(tmp_path, "finetune", "--data", str(tmp_path / "nowhere")))
    assert proc.returncode == 2
    assert "spottune-train: error: --data" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ demo

def test_fashion_resnet_asset_matches_its_record():
    from spottune_ext import demo
    from spottune_ext.models.weights import sha256_of
    record = Path(f"{demo.FASHION_RESNET}.sha256").read_text().split()
    assert record == [sha256_of(demo.FASHION_RESNET), demo.FASHION_RESNET.name]
    assert json.loads(demo.FASHION_RESNET.with_suffix(".json").read_text())["sha256"] == record[0]
    backbone, _ = load_checkpoint(str(demo.FASHION_RESNET))
    assert isinstance(backbone, DecathlonResNet) and backbone.num_classes == 10


def test_demo_refuses_a_source_model_that_is_not_the_recorded_one(tmp_path, monkeypatch, capsys):
    from spottune_ext import demo
    fake = tmp_path / "fashion_resnet26.pt"
    save_checkpoint(DecathlonResNet(10, (1, 1, 1), (8, 16, 16), 8), str(fake))
    Path(f"{fake}.sha256").write_text(Path(f"{demo.FASHION_RESNET}.sha256").read_text())
    monkeypatch.setattr(demo, "FASHION_RESNET", fake)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "differs from the one recorded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # stopped before any training


def test_demo_quick_runs_every_step(tmp_path):
    from spottune_ext import demo
    demo.main(["--quick", "--seeds", "2", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs, rows = summary["runs"], summary["rows"]
    assert [(r["source"], r["strategy"], r["seed"]) for r in runs] == [
        (s[0], t[0], seed) for s in demo.SOURCES for t in demo.STRATEGIES for seed in (0, 1)]
    for run in runs:
        assert run["train_split"] == "train" and 0 <= run["test_accuracy"] <= 1
        routed = run["strategy"] == "SpotTune"
        assert bool(run["plots"]) == routed and all(is_png(p) for p in run["plots"])
        assert Path(run["out"]) == tmp_path / dict(demo.SOURCES)[run["source"]] / dict(demo.STRATEGIES)[
            run["strategy"]] / f"s{run['seed']}"
    assert [(r["source"], r["strategy"]) for r in rows] == [(s[0], t[0]) for s in demo.SOURCES for t in demo.STRATEGIES]
    for row in rows:
        accs = [r["test_accuracy"] for r in runs if (r["source"], r["strategy"]) == (row["source"], row["strategy"])]
        mean, half = row["test_accuracy"]
        assert row["seeds"] == 2 and mean == pytest.approx(sum(accs) / 2) and half >= 0
        routed = row["strategy"] == "SpotTune"
        assert row["images_per_s_grouped"] > 0 and (row["images_per_s_dense"] is not None) == routed
        assert ("minus_finetune" in row) == routed
    text = (tmp_path / "summary.md").read_text()
    assert "QUICK SETUP CHECK" in text and "95% t-interval over seeds 0 to 1" in text


@pytest.mark.parametrize("argv, expected", [
    ([], ((32, 64), 32, 0.5, None)),
    (["--policy-size", "paper"], ((64, 128, 256), 32, None, None)),
    (["--policy-widths", "32", "--policy-input-scale", "0.25"], ((32,), 32, 0.25, None)),
    (["--policy-stem-width", "16", "--policy-input-size", "24"], ((64, 128, 256), 16, None, 24)),
])
def test_policy_flags_pick_or_describe_the_policy(argv, expected):
    from spottune_ext.models import resnet26
    from spottune_ext.train.model import build_model
    args = train.parse_args(["--arch", "resnet26", "--data", "digits", "--out", "unused"] + argv)
    policy = build_model(args, resnet26(10), 10).policy
    assert (policy.widths, policy.stem_width, policy.input_scale, policy.input_size) == expected


def test_demo_runs_the_recipes_of_the_study():
    from spottune_ext import demo
    from spottune_ext.train import recipes
    argv = recipes.arguments("mnv2-imagenet", "spottune", demo.TARGET, 0.001, 4)
    args = train.parse_args(argv + ["--out", "unused"])
    assert (args.max_per_class, args.max_eval_per_class, args.epochs, args.batch_size, args.image_size) == (
        recipes.IMAGES_PER_CLASS, recipes.EVAL_PER_CLASS, recipes.EPOCHS, recipes.BATCH, 32)
    assert args.policy_widths == [32, 64] and args.seed == 4 and args.lr == 0.001
    assert {s for _, s in demo.SOURCES} == set(recipes.SOURCES)


def test_tensorboard_is_optional(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    err = error_of(tiny_argv(tmp_path, "finetune", "--tensorboard"), capsys)
    assert "--tensorboard needs the tensorboard package" in err
