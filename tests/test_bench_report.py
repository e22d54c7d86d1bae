"""bench/report.py, bench/plot.py and bench/matrix.py on small hand-made pytest-benchmark runs; bench/interleaved.py
on a tiny case."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(group, impl, median, **extra):
    return {"name": f"test[{impl}]", "group": group, "stats": {"median": median, "iqr": 0.0, "rounds": 3},
            "extra_info": {"impl": impl, "baseline": "dense", **extra}}


def _run():
    benches = []
    for fraction, grouped, dense in ((0.0, 0.5, 1.0), (0.5, 0.7, 1.0), (1.0, 0.9, 1.0), ("policy", 0.6, 1.0)):
        info = dict(measure="inference", model="resnet50", batch=16, fraction=fraction,
                    routed_fraction=0.4 if fraction == "policy" else fraction)
        group = f"resnet50 b16 fraction {fraction}: inference"
        benches.append(_bench(group, "grouped", grouped, images_per_s=16 / grouped, **info,
                              targets=[{"vs": "dense", "max_ratio": 0.6}]))
        benches.append(_bench(group, "dense", dense, images_per_s=16 / dense, **info))
    memory = "resnet50 b16 fraction 0.5: train-memory"
    benches.append(_bench(memory, "grouped", 2.0, metric="peak_mib", peak_mib=60.0, measure="train-memory",
                          targets=[{"vs": "dense", "max_ratio": 0.65, "metric": "peak_mib"}]))
    benches.append(_bench(memory, "dense", 1.0, metric="peak_mib", peak_mib=100.0, measure="train-memory"))
    return {"benchmarks": benches, "machine_info": {}, "datetime": "2026-01-01T00:00:00"}


def test_report_targets_and_metric():
    text = _load("report").render(_run(), "t", ["throughput_cpu.png"])
    assert "fraction 0.0: inference: grouped / dense = 0.500 (target <= 0.6): met" in text
    assert "fraction 1.0: inference: grouped / dense = 0.900 (target <= 0.6): MISSED" in text
    # the memory group compares peak_mib (60 / 100), not the time (2.0 / 1.0)
    assert "train-memory: grouped / dense = 0.600 (target <= 0.65): met" in text
    assert "| grouped | 60.0 | 2 s | 0 us | 3 | 0.600x |" in text
    assert "![throughput_cpu.png](throughput_cpu.png)" in text


def test_plot_points_and_png(tmp_path):
    plot = _load("plot")
    points = plot.throughput_points(_run())
    batch, lines = points["resnet50"]
    assert batch == 16
    assert lines["grouped"]["fixed"] == [(0.0, 32.0), (0.5, 16 / 0.7), (1.0, 16 / 0.9)]
    assert lines["grouped"]["policy"] == (0.4, 16 / 0.6)
    out = tmp_path / "t.png"
    plot.plot(_run(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no inference benchmark"):
        plot.plot({"benchmarks": []}, tmp_path / "empty.png")


def _matrix_run():
    benches = []
    for size, grouped_train in ((64, 1.2), (224, 1.3)):
        for measure, impl, median, targets in (
                ("train-step", "finetune", 1.0, []), ("train-step", "dense", 2.0, []),
                ("train-step", "grouped", grouped_train, [{"vs": "dense", "max_ratio": 0.75},
                                                          {"vs": "finetune", "max_ratio": 1.25 if size == 224 else 1.35},
                                                          {"vs": "split", "max_ratio": 1.1}]),
                ("train-step", "policy", 0.05, [{"vs": "finetune", "max_ratio": 0.1}]),
                ("train-step", "split", 1.1, []),
                ("inference", "plain", 0.3, []), ("inference", "plain+policy", 0.32, []),
                ("inference", "split", 0.384, []), ("inference", "dense", 0.6, []),
                ("inference", "grouped", 0.4, [{"vs": "plain+policy", "max_ratio": 1.1}, {"vs": "split", "max_ratio": 1.1}]),
                ("inference", "policy", 0.02, [])):
            benches.append(_bench(f"resnet18 {size}px b32 fraction 0.5: {measure}", impl, median, model="resnet18",
                                  size=size, batch=32, measure=measure, fraction=0.5, targets=targets))
    return {"benchmarks": benches}


def test_matrix_summary(tmp_path):
    matrix = _load("matrix")
    text = matrix.render(_matrix_run())
    assert ("| resnet18 | 64x64 | 32 | 0.60 (≤ 0.75: met) | 1.20 (≤ 1.35: met) | 0.05 (≤ 0.1: met) | "
            "1.09 (≤ 1.1: met) | 1.10 | 1.25 (≤ 1.1: MISSED) | 1.04 (≤ 1.1: met) | 1.20 | 0.67 | 0.07 |") in text
    assert ("| resnet18 | 224x224 | 32 | 0.65 (≤ 0.75: met) | 1.30 (≤ 1.25: MISSED) | 0.05 (≤ 0.1: met) | "
            "1.18 (≤ 1.1: MISSED) |") in text
    assert "Targets: 8 met, 4 missed." in text
    matrix.plot(_matrix_run(), tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_includes_sections(tmp_path, monkeypatch):
    import json
    import sys
    run, section, out = tmp_path / "run.json", tmp_path / "section.md", tmp_path / "RESULTS.md"
    run.write_text(json.dumps(_run()))
    section.write_text("| a | b |\n")
    monkeypatch.setattr(sys, "argv", ["report.py", str(run), "--title", "Ops", "--include", f"Matrix, CPU={section}",
                                      "--out", str(out)])
    _load("report").main()
    text = out.read_text()
    assert text.index("## Ops") < text.index("## Matrix, CPU\n\n| a | b |")


def test_interleaved_table(tmp_path):
    # A subprocess: bench/interleaved.py selects the matrix's executions through the environment.
    out = tmp_path / "interleaved.md"
    subprocess.run([sys.executable, str(BENCH / "interleaved.py"), "--size", "32", "--batch", "4", "--rounds", "3",
                    "--models", "resnet26", "--out", str(out)], check=True, cwd=BENCH.parent, timeout=600)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("3 interleaved rounds, 32x32, batch 4, fraction 0.5")
    header, row = lines[2], lines[4]
    assert "train: grouped / split" in header and "inference: split / plain+policy" in header
    cells = row.strip("|").split("|")
    assert cells[0].strip() == "resnet26" and len(cells) == header.count("|") - 1
    for cell in cells[1:]:  # median [q1, q3] of per-round time ratios
        median, q1, q3 = (float(v) for v in cell.replace("[", "").replace("]", "").replace(",", "").split())
        assert 0 < q1 <= median <= q3
