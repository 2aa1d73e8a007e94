"""What the daemon tells the outside (``gpuengine/daemon/status.py``, ``gpuengine/systemd.py``):
sd_notify datagrams to a socket file and the abstract namespace, and ``gpuengine status`` on a
fresh, stale, stopped and missing status file. The status of a running daemon is checked in
test_daemon.py."""

from __future__ import annotations

import json
import uuid

from cli_runs import cli
from conftest import datagram_socket
from gpuengine.config import environment
from gpuengine.daemon import StatusBoard, atomic_write_json, check_status
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
