"""How files reach the daemon and when one is ready to take (``gpuengine/daemon/files.py``,
``inbox.py``, ``events.py``): ignore rules, completeness of plain and gzip files, markers,
settle and quiet periods on a fake clock, atomic writes, free names, error records, network
filesystems and inotify wake-ups. In process; the daemon as a whole is in test_daemon.py."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest

from conftest import rename_without_evidence
from gpuengine.config import EmbedConfig
from gpuengine.daemon import (InboxWatcher, ServeConfig, atomic_write_json, error_record,
                              free_name, gzip_complete, is_ignored, looks_complete)
from gpuengine.errors import InputError, UsageError


def test_ignore_rules():
    for name in [".x.fa", ".hidden", "x.fa.part", "x.fa.tmp", "x.fa.fai", "x.fa.fxi",
                 "x.fa.done", ".x.fa.done"]:
        assert is_ignored(name), name
    for name in ["x.fa", "x.fasta.gz", "reads", "x.part.fa", "done", "x.fa.gz"]:
        assert not is_ignored(name), name


def test_completeness_of_plain_and_gzip_files(tmp_path):
    plain = tmp_path / "a.fa"
    plain.write_text(">a\nMKV\n")
    assert looks_complete(plain)
    plain.write_text(">a\nMKV")
    assert not looks_complete(plain)
    plain.write_bytes(b"")
    assert not looks_complete(plain)
    data = gzip.compress(b">a\nMKV\n" * 5000)
    whole = tmp_path / "a.fa.gz"
    whole.write_bytes(data)
    assert gzip_complete(whole) and looks_complete(whole)
    whole.write_bytes(data + gzip.compress(b">b\nMK\n"))  # multi-member (as BGZF)
    assert looks_complete(whole)
    for cut in (len(data) - 1, len(data) - 8, len(data) // 2, 12):
        whole.write_bytes(data[:cut])
        assert not looks_complete(whole), cut
    whole.write_bytes(data + b"\x00\x00")  # trailing garbage: fasta.py would reject it too
    assert not looks_complete(whole)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_marker_makes_a_file_ready_at_once(tmp_path):
    watcher = InboxWatcher(tmp_path, settle=100, clock=Clock())
    (tmp_path / "x.fa").write_text(">a\nMK")  # incomplete, just written: not by itself
    assert watcher.poll() == []
    (tmp_path / "x.fa.done").touch()
    assert watcher.poll() == ["x.fa"]
    (tmp_path / "orphan.fa.done").touch()  # a marker without its file is nothing
    assert watcher.poll() == ["x.fa"] and watcher.depth == 1


def test_in_place_file_is_ready_only_when_stable_for_settle_and_complete(tmp_path):
    clock = Clock()
    watcher = InboxWatcher(tmp_path, settle=5, clock=clock)
    path = tmp_path / "x.fa"
    path.write_text(">a\nMKV\n")
    assert watcher.poll() == []
    clock.now += 4
    assert watcher.poll() == []  # unchanged, but not for 5 s yet
    with open(path, "a") as fh:  # the writer goes on: the clock starts again
        fh.write(">b\nMK\n")
    clock.now += 4
    assert watcher.poll() == []
    clock.now += 4
    assert watcher.poll() == []  # 4 s since the change
    clock.now += 1.5
    assert watcher.poll() == ["x.fa"]
    with open(path, "a") as fh:  # no final newline: stable but incomplete, it waits
        fh.write(">c\nMK")
    for _ in range(3):
        clock.now += 10
        assert watcher.poll() == []
    assert watcher.waiting == ["x.fa"]


def test_renamed_file_is_ready_after_two_polls(tmp_path):
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    watcher = InboxWatcher(inbox, settle=1000, clock=Clock())
    (staging / "x.fa").write_text(">a\nMKV")  # no final newline: only the rename vouches
    time.sleep(0.03)  # past the timestamp tick: the rename stamps a later ctime
    os.replace(staging / "x.fa", inbox / "x.fa")
    assert watcher.poll() == []
    assert watcher.poll() == ["x.fa"]


def test_file_moved_in_with_an_old_mtime_is_ready_after_two_polls(tmp_path):
    """A file appearing between two polls, last written before the earlier one, was written
    elsewhere (here the earlier poll is made to look 10 s later than the write)."""
    watcher = InboxWatcher(tmp_path, settle=1000, clock=Clock(),
                           wall_ns=lambda: time.time_ns() + 10**10)
    assert watcher.poll() == []
    (tmp_path / "x.fa").write_text(">a\nMKV")
    assert watcher.poll() == []
    assert watcher.poll() == ["x.fa"]
    control = InboxWatcher(tmp_path, settle=1000, clock=Clock())  # real clocks: no evidence
    assert control.poll() == []
    (tmp_path / "y.fa").write_text(">a\nMKV\n")
    assert control.poll() == [] and control.poll() == []


@pytest.mark.parametrize("delivery", ["in place", "renamed in the same tick"])
def test_a_file_that_stays_incomplete_is_taken_after_the_quiet_period(tmp_path, delivery, caplog):
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    clock = Clock()
    watcher = InboxWatcher(inbox, settle=5, quiet_period=30, clock=clock)
    assert watcher.poll() == []
    if delivery == "in place":
        (inbox / "x.fa").write_text(">a\nMKV")  # no final newline
    else:
        (staging / "x.fa").write_text(">a\nMKV")
        rename_without_evidence(staging / "x.fa", inbox / "x.fa")
    assert watcher.poll() == []
    for _ in range(5):  # 5 s .. 25 s unchanged: past --settle, waiting (listed as such)
        clock.now += 5
        assert watcher.poll() == [] and watcher.waiting == ["x.fa"]
    clock.now += 4.5  # 29.5 s
    assert watcher.poll() == []
    with caplog.at_level("WARNING", logger="gpuengine.daemon"):
        clock.now += 0.5  # 30 s: taken as it is
        assert watcher.poll() == ["x.fa"] and watcher.waiting == []
        assert watcher.poll() == ["x.fa"]  # still there (not claimed): still ready, one warning
    assert [r.getMessage() for r in caplog.records if r.getMessage().endswith(": taking it as it is")] \
        == ["inbox/x.fa has not changed for 30 s (--quiet-period) though it looks incomplete "
            "(not whole gzip data or no final newline): taking it as it is"]


def test_a_change_restarts_the_quiet_period(tmp_path):
    clock = Clock()
    watcher = InboxWatcher(tmp_path, settle=5, quiet_period=30, clock=clock)
    path = tmp_path / "x.fa"
    path.write_text(">a\nMKV")
    watcher.poll()
    clock.now += 25
    assert watcher.poll() == [] and watcher.waiting == ["x.fa"]
    with open(path, "a") as fh:  # the writer was only slow: 25 s more from now
        fh.write("L")
    clock.now += 25
    assert watcher.poll() == []
    clock.now += 25
    assert watcher.poll() == []
    clock.now += 5
    assert watcher.poll() == ["x.fa"]


def test_quiet_period_must_not_be_shorter_than_settle(tmp_path):
    embed = EmbedConfig(inputs=(tmp_path,), model="m", out=tmp_path / "s.lmdb")
    ServeConfig(watch=tmp_path, embed=embed, settle=5, quiet_period=5)
    for bad in (4.9, float("nan")):
        with pytest.raises(UsageError, match="--quiet-period must be at least --settle"):
            ServeConfig(watch=tmp_path, embed=embed, settle=5, quiet_period=bad)


def test_inbox_skips_ignored_names_directories_and_symlinks(tmp_path):
    clock = Clock()
    watcher = InboxWatcher(tmp_path, settle=1, clock=clock)
    for name in [".x.fa", "x.fa.part", "x.fa.tmp", "x.fa.fai", "x.fa.fxi", "good.fa"]:
        (tmp_path / name).write_text(">a\nMKV\n")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "link.fa").symlink_to(tmp_path / "good.fa")
    watcher.poll()
    clock.now += 2
    assert watcher.poll() == ["good.fa"] and watcher.depth == 1


def test_atomic_write_json_replaces_whole_files_only(tmp_path):
    path = tmp_path / "status.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2, "text": "é"})
    assert json.loads(path.read_text()) == {"a": 2, "text": "é"}

    class Bad:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        atomic_write_json(path, {"a": Bad()})
    assert json.loads(path.read_text()) == {"a": 2, "text": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporary left


def test_free_name_never_overwrites(tmp_path):
    assert free_name(tmp_path, "x.fa.gz") == "x.fa.gz"
    (tmp_path / "x.fa.gz").touch()
    assert free_name(tmp_path, "x.fa.gz") == "x~2.fa.gz"
    (tmp_path / "x~2.fa.gz").touch()
    assert free_name(tmp_path, "x.fa.gz") == "x~3.fa.gz"


def test_error_record_names_file_line_record_and_character(tmp_path):
    from gpuengine.fasta import validate
    from gpuengine.models.registry import family

    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nMKV\n>broken desc\nMKVL\nMK1L\n")
    with pytest.raises(InputError) as caught:
        validate([bad], alphabet=family("esm2").alphabet)
    record = error_record("bad.fa", caught.value, kind="input", attempts=1, sha256="x")
    assert record["record"] == "broken" and record["character"] == "1"
    assert record["position"] == {"line": 5, "column": 3}
    assert record["problems"][0]["file"] == "bad.fa" and record["attempts"] == 1
    gz = error_record("t.fa.gz", InputError("t.fa.gz: truncated or corrupt gzip data after line "
                                            "7 (EOF)"), kind="input", attempts=1, sha256=None)
    assert gz["position"] == {"line": 7, "column": None} and "truncated" in gz["reason"]


# -- filesystem events ---------------------------------------------------------------------------

def test_network_filesystems_are_detected_from_mountinfo(tmp_path):
    from gpuengine.daemon.events import filesystem_type, is_network_filesystem

    info = ("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
            "40 22 0:50 / /data rw - nfs4 server:/export rw\n"
            "41 40 0:51 / /data/local\\040disk rw - xfs /dev/sdb rw\n")
    assert filesystem_type(Path("/data/runs/inbox"), info) == "nfs4"
    assert filesystem_type(Path("/data/local disk/inbox"), info) == "xfs"
    assert filesystem_type(Path("/home/x"), info) == "ext4"
    assert is_network_filesystem("nfs4") and is_network_filesystem("fuse.sshfs")
    assert not is_network_filesystem("ext4") and not is_network_filesystem(None)


def test_inotify_wakes_the_loop_early_and_poll_mode_does_not(tmp_path):
    import threading

    from gpuengine.daemon.events import Waker

    stop = threading.Event()
    waker = Waker(tmp_path)
    try:
        if waker.fd is None:
            pytest.skip(f"no inotify here: {waker.mode}")
        timer = threading.Timer(0.1, lambda: (tmp_path / "x.fa.part").rename(tmp_path / "x.fa"))
        (tmp_path / "x.fa.part").write_text(">a\nMK\n")
        started = time.monotonic()
        timer.start()
        assert waker.wait(5.0, stop) is True
        assert time.monotonic() - started < 2.0
        timer.join()
    finally:
        waker.close()
    polling = Waker(tmp_path, force_poll=True)
    assert polling.fd is None and "poll" in polling.mode
    started = time.monotonic()
    assert polling.wait(0.3, stop) is False
    assert time.monotonic() - started >= 0.29
