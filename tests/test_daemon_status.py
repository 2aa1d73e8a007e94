"""What the daemon tells the outside (``gpuengine/daemon/status.py``, ``gpuengine/systemd.py``):
sd_notify datagrams to a socket file and the abstract namespace, and ``gpuengine status`` on a
fresh, stale, stopped and missing status file; what status.json and ``gpuengine status`` say
while the daemon embeds (records counted as the progress bar counts them: stored before,
committed now or failed, of every valid record; a group of files; the file latency). The
status of a running daemon is checked in test_daemon.py."""

from __future__ import annotations

import json
import uuid

from cli_runs import cli
from conftest import datagram_socket
from gpuengine.config import environment
from gpuengine.daemon import StatusBoard, atomic_write_json, check_status
from gpuengine.daemon.status import _FileProgress, format_status, status_line
from gpuengine.progress import ProgressSnapshot
from gpuengine.systemd import notify


def test_sd_notify_to_a_socket_file_and_to_the_abstract_namespace(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    with datagram_socket(path) as sock:
        assert notify("READY=1\nSTATUS=ready", socket_path=path)
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready"
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("STOPPING=1", environment().notify_socket)
        assert sock.recv(4096) == b"STOPPING=1"
    abstract = f"@gpuengine-test-{uuid.uuid4().hex}"
    with datagram_socket(abstract) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", abstract)
        assert notify("WATCHDOG=1", environment().notify_socket)
        assert sock.recv(4096) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1", environment().notify_socket) is False  # not under systemd: a no-op
    assert notify("READY=1", socket_path=str(tmp_path / "nobody")) is False  # never raises


def test_status_command_fresh_stale_stopped_and_missing(tmp_path):
    board = StatusBoard(tmp_path, interval=2.0, notify=lambda message: None)
    board.update(state="ready", queue=3)
    board.write()
    result = cli("status", tmp_path)
    assert result.exit_code == 0, result.output
    assert "ready" in result.stdout and "3 in inbox" in result.stdout
    data = json.loads((tmp_path / "status.json").read_text())
    assert check_status(data, now=data["heartbeat_unix"] + 5.9)[0]
    healthy, verdict = check_status(data, now=data["heartbeat_unix"] + 6.1)  # > 3 x 2 s
    assert not healthy and "stale heartbeat" in verdict
    data["heartbeat_unix"] -= 60
    data["pid"] = 2**22 + 7  # no such process
    atomic_write_json(tmp_path / "status.json", data)
    result = cli("status", tmp_path, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["healthy"] is False
    assert "stale heartbeat" in result.stderr and "gone" in result.stderr
    board.close(state="stopped", exit_code=0)
    result = cli("status", tmp_path / "status.json")
    assert result.exit_code == 1 and "not running" in result.stderr
    assert cli("status", tmp_path / "nothing").exit_code == 1


def _board(tmp_path) -> StatusBoard:
    board = StatusBoard(tmp_path, 5.0, notify=lambda message: None)
    board.update(state="ready", processing={"file": "a.fa", "attempt": 2, "since": "now",
                                            "done_records": 0, "committed_records": 0,
                                            "total_records": None, "stage": "starting"})
    return board


def test_a_resumed_file_counts_its_stored_records_as_done_like_the_bar(tmp_path):
    board = _board(tmp_path)
    progress = _FileProgress(board)
    progress.start(100, 5000)
    progress.update(ProgressSnapshot(committed_records=10, total_records=100, tokens_done=0,
                                     elapsed=1.0, stored_records=60, failed_records=1))
    current = board.data["processing"]
    assert (current["done_records"], current["committed_records"], current["stored_records"],
            current["failed_records"], current["total_records"]) == (71, 10, 60, 1, 100)
    assert "embedding a.fa (71/100 records)" in status_line(board.data)
    assert "a.fa: 71 of 100 records done (attempt 2, embedding)" in format_status(
        board.data, "ready")


def test_an_older_status_file_without_done_records_still_reads(tmp_path):
    data = {"state": "ready", "processing": {"file": "a.fa", "committed_records": 5,
                                            "total_records": 9}}
    assert "(5/9 records)" in status_line(data)


def test_a_group_and_the_file_latency(tmp_path):
    board = _board(tmp_path)
    board.update_processing(file="b.fa", group={"files": 200, "done": 37, "pending": 163})
    for seconds in (1.0, 2.0, 3.0, 10.0):
        board.file_latency(seconds)
    assert board.data["file_latency_seconds"] == {"median": 2.5, "p90": 10.0, "files": 4}
    text = format_status(board.data, "ready")
    assert "b.fa and 162 more files (37 of 200 done)" in text
    assert "latency    median 2.5 s, 90th percentile 10.0 s" in text
