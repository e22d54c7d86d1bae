"""The one file writer: a file is replaced whole or left as it was."""
import json

import pytest

from spottune_ext.io import atomic_write, write_csv, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"accuracy": 0.5})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as f:
            f.write('{"accuracy": ')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_writers_replace_the_file(tmp_path):
    write_text(tmp_path / "a.md", "old")
    write_text(tmp_path / "a.md", "new\n")
    assert (tmp_path / "a.md").read_text() == "new\n"
    write_csv(tmp_path / "m.csv", [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": None}])
    assert (tmp_path / "m.csv").read_text().splitlines() == ["epoch,loss", "1,0.5", "2,"]
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.bin", "m.csv"]
