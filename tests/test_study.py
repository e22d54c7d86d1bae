"""The accuracy study's plumbing (bench/study.py --tiny): records, resuming, the report. Not its numbers."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY = [sys.executable, str(ROOT / "bench" / "study.py")]
KEYS = {"source", "target", "strategy", "seed", "val_accuracy", "test_accuracy", "epochs", "images_per_class",
        "train_time_s", "block_usage", "command", "lr", "val_curve"}


def study(*args, out):
    proc = subprocess.run([*STUDY, *args, "--tiny", "--out", str(out), "--threads", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study("tune", out=out)
    study("run", out=out)
    return out


def test_every_run_has_a_record_with_its_command(tiny_study):
    records = [json.loads(p.read_text()) for p in sorted((tiny_study / "runs").glob("*.json"))]
    assert {r["strategy"] for r in records} == {"spottune", "finetune", "global_k"}
    for rec in records:
        assert KEYS <= set(rec)
        name = f"{rec['source']}__{rec['target']}__{rec['strategy']}__s{rec['seed']}.json"
        assert (tiny_study / "runs" / name).exists()
        assert rec["command"].startswith("python -m spottune_ext.train ") and f"--seed {rec['seed']}" in rec["command"]
        assert f"--lr {rec['lr']}" in rec["command"]
        assert 0 <= rec["test_accuracy"] <= 1 and len(rec["val_curve"]) == rec["epochs"]
        routed = rec["strategy"] != "finetune"
        assert (rec["block_usage"] is not None) == routed
        assert (rec["exported"] is not None) == (rec["strategy"] == "global_k")
    assert not (tiny_study / "scratch").exists()


def test_finished_runs_are_skipped(tiny_study):
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_study / "runs").glob("*.json")}
    assert "0 to run" in study("run", out=tiny_study)
    assert before == {p.name: p.stat().st_mtime_ns for p in (tiny_study / "runs").glob("*.json")}


def test_report(tiny_study, tmp_path):
    report = tmp_path / "ACCURACY.md"
    proc = subprocess.run([*STUDY, "report", "--tiny", "--out", str(tiny_study), "--report", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert "| r26-fashion | digits |" in text and "SpotTune − fine-tuning (paired)" in text
    assert (tmp_path / "accuracy" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "accuracy" / "curves.png").stat().st_size > 1000


def test_grid_lists_its_settings():
    proc = subprocess.run([*STUDY, "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "mnv2-imagenet" in proc.stdout and "5 seeds" in proc.stdout and "global_k" in proc.stdout


def _study_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import study
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return study


def test_recipes_learning_rates_are_the_ones_the_study_chose():
    study = _study_module()
    from spottune_ext.train import recipes
    assert study.chosen_lrs(study.OUT, study.settings(False)) == recipes.LEARNING_RATES


def test_long_runs_have_one_folder_per_length(tmp_path):
    study = _study_module()
    shutil.copytree(study.OUT / "tune", tmp_path / "tune")
    jobs = study.long_jobs(tmp_path, study.settings(False), threads=1)
    targets = study.SOURCES[study.LONG_SOURCE]["targets"]
    assert len(jobs) == len(study.LONG) * study.SOURCES[study.LONG_SOURCE]["seeds"] * len(targets) * 2
    for epochs, folder in study.LONG.items():
        mine = [j for j in jobs if j["path"].parent == tmp_path / folder]
        assert {j["meta"]["strategy"] for j in mine} == set(study.LONG_STRATEGIES)
        assert {j["meta"]["target"] for j in mine} == set(targets)
        for job in mine:
            flags = job["cmd"][job["cmd"].index("--epochs"):]
            assert flags[1] == str(epochs) and job["cmd"].count("--epochs") == 1
