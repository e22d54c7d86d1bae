"""The trainer's command line: every flag's bad values end in one line naming the flag (exit 2) before
anything is written, the run directory is never mixed with or destroyed by another run, and a run whose
policy turns non-finite stops with an error (exit 1)."""
import json

import pytest
import torch

from spottune_ext import train
from spottune_ext.models import DecathlonResNet, save_checkpoint

TINY = ["--arch", "resnet26", "--widths", "8", "16", "16", "--layers", "1", "1", "1", "--stem-width", "8",
        "--data", "digits", "--image-size", "16", "--max-per-class", "6", "--max-eval-per-class", "2",
        "--batch-size", "16", "--max-train-batches", "2", "--threads", "1", "--no-progress", "--device", "cpu",
        "--policy-widths", "32", "--epochs", "1"]
FINETUNE = [a for a in TINY if a not in ("--policy-widths", "32")] + ["--strategy", "finetune"]


def _table():
    """(flag, extra arguments, text the error must hold): placeholders in braces are filled per test."""
    number = lambda flag, *bad: [(flag, [flag, b], f"argument {flag}: expected") for b in bad]  # noqa: E731
    switch = lambda flag: [(flag, [f"{flag}=1"], f"argument {flag}: ignored explicit argument")]  # noqa: E731
    cases = [
        ("--arch", ["--arch", "vgg16"], "argument --arch: invalid choice: 'vgg16'"),
        ("--arch", ["--arch", "resnet18"], "--widths, --layers and --stem-width shape a resnet26 only, not the --arch"),
        ("--weights", ["--weights", "{missing}"], "does not exist"),
        ("--weights", ["--weights", "{text_file}"], "--weights {text_file}: not a readable weights file"),
        ("--weights", ["--weights", "{backbone}", "--arch", "resnet26"],
         "--widths, --layers and --stem-width cannot reshape the backbone that --weights {backbone} holds"),
        ("--weights-sha256", ["--weights-sha256", "xyz"], "argument --weights-sha256: expected 1 to 64 hexadecimal"),
        ("--weights-sha256", ["--weights-sha256", ""], "argument --weights-sha256: expected"),
        ("--weights-sha256", ["--weights", "{backbone}", "--arch", "resnet26", "--widths", "8", "16", "16",
                              "--weights-sha256", "00ff"], "does not start with --weights-sha256 00ff"),
        ("--widths", ["--widths", "8", "16"], "--layers [1, 1, 1] and --widths [8, 16] need one block count"),
        ("--layers", ["--layers", "1", "1"], "--layers [1, 1] and --widths [8, 16, 16] need one block count"),
        ("--stem-width", ["--stem-width", "32"], "--stem-width 32 and --widths [8, 16, 16] must not shrink"),
        ("--strategy", ["--strategy", "magic"], "argument --strategy: invalid choice: 'magic'"),
        ("--adaptive-blocks", ["--adaptive-blocks", "3"], "--adaptive-blocks must be block indices in 0..2"),
        ("--global-k", ["--global-k", "1"], "--global-k, --lambda1 and --lambda2 go with --strategy global_k"),
        ("--global-k", ["--strategy", "global_k", "--global-k", "4"], "--global-k 4: more than the 3 routed"),
        ("--lambda1", ["--lambda1", "1"], "--global-k, --lambda1 and --lambda2 go with --strategy global_k"),
        ("--lambda2", ["--lambda2", "1"], "--global-k, --lambda1 and --lambda2 go with --strategy global_k"),
        ("--strategy-opt", ["--strategy-opt", "k"], "argument --strategy-opt: expected NAME=VALUE, got 'k'"),
        ("--strategy-opt", ["--strategy-opt", "=2"], "argument --strategy-opt: expected NAME=VALUE"),
        ("--strategy-opt", ["--strategy-opt", "alpha=nan"], "argument --strategy-opt: alpha must be a finite number"),
        ("--strategy-opt", ["--strategy", "l2sp", "--strategy-opt", "foo=1"],
         "--strategy l2sp --strategy-opt foo=1: strategy 'l2sp' got unknown options"),
        ("--strategy-opt", ["--strategy", "finetune_last_k", "--strategy-opt", "k=9"], "k=9 but only 3 adaptive"),
        ("--tau", ["--tau", "2"], "'finetune' has no learned policy: --tau"),
        ("--policy-widths", ["--policy-widths", "32"], "'finetune' has no learned policy: --tau, --policy-size, --policy-widths"),
        ("--policy-stem-width", ["--policy-stem-width", "8"], "has no learned policy"),
        ("--policy-input-size", ["--strategy", "spottune", "--policy-input-size", "1"],
         "raise --image-size or --policy-input-size"),
        ("--eval-sample", ["--eval-sample"], "has no learned policy"),
        ("--policy-size", ["--policy-size", "huge"], "argument --policy-size: invalid choice"),
        ("--policy-size", ["--strategy", "spottune", "--policy-size", "paper", "--policy-widths", "32"],
         "--policy-size picks a policy network; --policy-widths"),
        ("--policy-size", ["--policy-size", "paper"], "has no learned policy: --tau, --policy-size"),
        ("--policy-input-scale", ["--strategy", "spottune", "--policy-input-size", "8", "--policy-input-scale", "0.5"],
         "give --policy-input-size or --policy-input-scale, not both"),
        ("--policy-input-scale", ["--strategy", "spottune", "--policy-input-scale", "0.1"],
         "raise --image-size or --policy-input-size (or --policy-input-scale)"),
        ("--execution", ["--execution", "fast"], "argument --execution: invalid choice"),
        ("--backend", ["--backend", "foo"], "argument --backend: invalid choice: 'foo'"),
        ("--backend", ["--backend", "cuda"], "--backend cuda: gumbel_st: backend 'cuda' runs on CUDA tensors"),
        ("--frozen-bn", ["--frozen-bn", "maybe"], "argument --frozen-bn: invalid choice"),
        ("--bn-stats", ["--bn-stats", "maybe"], "argument --bn-stats: invalid choice"),
        ("--policy-init-tuned", ["--strategy", "finetune", "--policy-init-tuned", "0.5"], "has no learned policy"),
        ("--data", ["--data", "{missing}"], "--data {missing}: unknown dataset"),
        ("--data", ["--data", "{empty_dir}"], "--data {empty_dir}:"),
        ("--domain", ["--domain", "aircraft"], "--domain goes with a Visual Decathlon directory"),
        ("--image-size", ["--image-size", "4"], "--image-size 4 is too small for resnet26: it downsamples by 8"),
        ("--max-eval-per-class", ["--max-eval-per-class", "0"], "argument --max-eval-per-class: expected"),
        ("--train-on-trainval", ["--out", "{run}", "--resume", "{run}", "--train-on-trainval"],
         "trained on train, this one on train+val"),
        ("--lr-steps", ["--lr-steps", "5", "2"], "--lr-steps must be increasing epochs >= 1, got [5, 2]"),
        ("--lr-steps", ["--lr-steps", "0"], "argument --lr-steps: expected an integer >= 1, got '0'"),
        ("--seed", ["--seed", "-1"], "argument --seed: expected an integer >= 0 and <= 4294967295, got '-1'"),
        ("--device", ["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
        ("--device", ["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N"),
        ("--device", ["--device", "cpu:1"], "--device: expected cpu, cuda or cuda:N"),
        ("--device", ["--device", "cuda:99"], "--device cuda:99:"),
        ("--out", ["--out", "{text_file}"], "--out {text_file}: exists and is not a directory"),
        ("--out", ["--out", "{text_file}/run"], "--out {text_file}/run: cannot create or write it"),
        ("--out", ["--out", "{other_dir}"], "--out {other_dir} is not empty (notes.txt): pass --resume"),
        ("--overwrite", ["--out", "{other_dir}", "--overwrite"], "holds no args.json, so it is not a run directory"),
        ("--overwrite", ["--out", "{run}", "--overwrite", "--weights", "{run}/backbone.pt"],
         "--overwrite would delete --weights {run}/backbone.pt"),
        ("--overwrite", ["--out", "{run}", "--overwrite", "--resume", "{run}"], "--overwrite starts a new run"),
        ("--resume", ["--resume", "{missing}"], "--resume {missing}: no checkpoint at"),
        ("--resume", ["--resume", "{empty_file}"], "--resume {empty_file}: not a readable checkpoint"),
        ("--resume", ["--resume", "{truncated}"], "--resume {truncated}: not a readable checkpoint"),
        ("--resume", ["--resume", "{text_file}"], "--resume {text_file}: not a readable checkpoint"),
        ("--resume", ["--resume", "{state_dict}"], "--resume {state_dict}: not a spottune_ext checkpoint"),
        ("--resume", ["--resume", "{backbone}"], "not a last.pt training checkpoint"),
        ("--resume", ["--out", "{run}", "--resume", "{run}", "--lr", "0.5"], "arguments differ from the run it"),
        ("--resume", ["--out", "{run}", "--resume", "{run}", "--strategy", "spottune"], "holds a different model"),
        ("--resume", ["--resume", "{run}", "--out", "{other_dir}"], "--resume continues the run in its own directory"),
        ("--resume", ["--resume", "{run}/last.pt"], "--resume continues the run in its own directory: pass --out"),
    ]
    cases += number("--widths", "0", "-8", "a")
    cases += number("--layers", "0")
    cases += number("--stem-width", "0")
    cases += number("--adaptive-blocks", "-1", "x")
    cases += number("--global-k", "nan", "-1", "inf")
    cases += number("--lambda1", "nan", "-1")
    cases += number("--lambda2", "inf", "-0.5")
    cases += number("--tau", "0", "-1", "nan", "inf", "1e-39", "2.9387e-39")
    cases += number("--policy-widths", "0")
    cases += number("--policy-stem-width", "0", "2.5")
    cases += number("--policy-input-size", "0")
    cases += number("--policy-input-scale", "0", "1.5", "nan")
    cases += number("--policy-init-tuned", "0", "1", "nan", "-0.5")
    cases += number("--image-size", "0", "-16")
    cases += number("--max-per-class", "0")
    cases += number("--workers", "-1")
    cases += number("--epochs", "0", "1.5")
    cases += number("--batch-size", "0")
    cases += number("--lr", "-1", "0", "nan", "inf")
    cases += number("--policy-lr", "0", "nan", "-inf", "1e400")
    cases += number("--momentum", "-1", "1", "nan")
    cases += number("--wd", "-1", "nan")
    cases += number("--policy-wd", "-1e-3", "inf")
    cases += number("--lr-gamma", "nan", "0", "-1")
    cases += number("--max-train-batches", "0")
    cases += number("--seed", "x", str(2 ** 32))
    cases += number("--threads", "0")
    for flag in ("--eval-sample", "--train-on-trainval", "--amp", "--channels-last", "--compile", "--no-deterministic",
                 "--overwrite", "--tensorboard", "--no-progress"):
        cases += switch(flag)
    if not torch.cuda.is_available():
        cases.append(("--device", ["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    return cases


CASES = _table()


def test_the_table_covers_every_flag():
    flags = {a.option_strings[-1] for a in train.build_parser()._actions if a.option_strings} - {"--help"}
    assert flags == {flag for flag, _, _ in CASES}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the table's placeholders name: a finished run, files that are no checkpoints, and so on."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    train.run(train.parse_args(FINETUNE + ["--out", str(run)]))
    backbone = DecathlonResNet(10, (1, 1, 1), (8, 16, 16), 8)
    save_checkpoint(backbone, str(run / "backbone.pt"))
    torch.save(backbone.state_dict(), root / "state_dict.pt")
    last = (run / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(last[:len(last) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty_dir").mkdir()
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("someone else's\n")
    return {"run": run, "backbone": run / "backbone.pt", "state_dict": root / "state_dict.pt",
            "truncated": root / "truncated.pt", "empty_file": root / "empty.pt", "text_file": root / "notes.txt",
            "empty_dir": root / "empty_dir", "other_dir": root / "other", "missing": root / "nowhere"}


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(argv, capsys):
    """The one line main() ends with on bad input (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("spottune-train: error: ")
    return last


@pytest.mark.parametrize("flag,extra,expected", CASES, ids=[f"{f} {' '.join(e)}" for f, e, _ in CASES])
def test_bad_value_is_one_line_naming_the_flag(flag, extra, expected, files, tmp_path, capsys):
    fill = {k: str(v) for k, v in files.items()}
    extra = [a.format(**fill) for a in extra]
    before = {name: snapshot(files[name]) for name in ("run", "other_dir", "empty_dir")}
    out = tmp_path / "out"
    line = error_line(FINETUNE + ["--out", str(out)] + extra, capsys)
    assert expected.format(**fill) in line and flag.split("=")[0] in line
    assert not out.exists()  # nothing written for bad input
    assert {name: snapshot(files[name]) for name in before} == before


# ----------------------------------------------------------------------------------------- run directory

def test_a_new_run_never_mixes_with_or_destroys_another(tmp_path, capsys):
    out = tmp_path / "run"
    train.run(train.parse_args(TINY + ["--out", str(out)]))
    spottune_files = snapshot(out)
    assert {"args.json", "results.json", "test_policies.csv", "block_usage.png"} <= {str(p) for p in spottune_files}

    # A fine-tuning run into it is refused, as is a failing one; neither touches a file.
    assert "is not empty" in error_line(FINETUNE + ["--out", str(out)], capsys)
    assert "--lr" in error_line(FINETUNE + ["--out", str(out), "--overwrite", "--lr", "nan"], capsys)
    assert "--data" in error_line(FINETUNE + ["--out", str(out), "--overwrite", "--data", str(tmp_path / "x")], capsys)
    assert snapshot(out) == spottune_files

    # --overwrite replaces it whole: no policy files or plots of the SpotTune run are left beside the new results.
    train.run(train.parse_args(FINETUNE + ["--out", str(out), "--overwrite"]))
    assert not {"test_policies.csv", "block_usage.png", "finetuned_blocks.png", "class_block_usage.png"} & {
        p.name for p in out.iterdir()}
    assert json.loads((out / "args.json").read_text())["strategy"] == "finetune"
    assert json.loads((out / "results.json").read_text())["strategy"] == "finetune"


def test_resume_continues_the_run_in_its_own_directory(tmp_path):
    out = tmp_path / "run"
    train.run(train.parse_args(FINETUNE + ["--out", str(out)]))
    results = train.run(train.parse_args(FINETUNE + ["--resume", str(out / "last.pt"), "--epochs", "2"]))
    assert results["epochs"] == 2 and len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    assert results["outputs"]["dir"] == str(out)  # --out defaults to the run's own directory


# ----------------------------------------------------------------------------------------- divergence

def test_a_policy_that_turns_non_finite_stops_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path / "run"), "--policy-lr", "1e38", "--epochs", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("spottune-train: error: policy parameter policy." in err
            or "spottune-train: error: the policy's decisions" in err)
    assert "became non-finite at epoch" in err and "lower --policy-lr or raise --tau" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_the_policy_is_checked_after_every_step(tmp_path, capsys, monkeypatch):
    # Spoil one policy weight in the second step, whatever the numbers would have done.
    step, calls = torch.optim.SGD.step, []

    def spoiling_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            policy = next(g for g in self.param_groups if g["name"] == "policy")
            with torch.no_grad():
                policy["params"][-1].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", spoiling_step)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
    assert line.startswith("spottune-train: error: policy parameter policy.") and line.endswith(
        "became non-finite at epoch 1, batch 2; lower --policy-lr or raise --tau")
