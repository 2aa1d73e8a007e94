"""``recorded_parts`` of an output directory that vanishes between being seen and being
listed (another run on the same path removing the directory it failed to fill: CI saw
``embed missing.fa -o new`` print a FileNotFoundError traceback while a concurrent failing
run cleaned up ``new``) answers "no store yet", as for a path that never existed."""

from __future__ import annotations

from pathlib import Path

from gpuengine.store import parts


def test_a_directory_gone_since_it_was_seen_holds_no_store(tmp_path, monkeypatch):
    gone = tmp_path / "new"
    seen = {gone}
    real_is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: self in seen or real_is_dir(self))
    assert parts.recorded_parts(gone) is None


def test_a_file_where_the_directory_was_holds_no_store(tmp_path, monkeypatch):
    now_a_file = tmp_path / "new"
    now_a_file.write_text("x")
    real_is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: self == now_a_file or real_is_dir(self))
    assert parts.recorded_parts(now_a_file) is None


def test_parts_still_counted(tmp_path):
    out = tmp_path / "out"
    (out / "part-01-of-02.lmdb").mkdir(parents=True)
    (out / "part-02-of-02.lmdb").mkdir()
    assert parts.recorded_parts(out) == 2
