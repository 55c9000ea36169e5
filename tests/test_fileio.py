"""Atomic writes: a complete new file or the old one, never a half-written file."""

from __future__ import annotations

import json

import pytest

from probsft_megatron.fileio import atomic_write, atomic_write_json, atomic_write_text


def test_writes_text_and_json_creating_the_folder(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "c.json").read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.txt", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "state.json", "old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    with pytest.raises(TypeError):  # not JSON-serializable: fails before anything is written
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
