"""A real ``gpuengine serve`` process for tests (:class:`Served`: its folders, status file and
the AF_UNIX notify socket it reports to, as systemd would), and the inputs and store checks
the daemon's process tests share (test_daemon.py, test_daemon_groups.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import datagram_socket, random_proteins
from held_process import held_command, held_env

ROOT = Path(__file__).resolve().parents[1]


def child_env(tmp_path: Path, notify_address: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "GPUENGINE_OFFLINE": "1", "GPUENGINE_CACHE": str(tmp_path / "cache"),
            "NOTIFY_SOCKET": notify_address}


class Served:
    """A ``gpuengine serve`` process and the notify socket it reports to."""

    def __init__(self, tmp_path: Path, model: Path, *extra: str, log: str = "serve",
                 held: bool | int = False):
        """``held``: each run takes no batch after its first ones (True: the default
        :data:`held_process.BATCHES` of them; a number: that many) until a signal halts it
        (held_process.py), for a test that signals the daemon once a file's first commit,
        or a file's completion, is seen."""
        self.dir = tmp_path / "watch"
        self.store = tmp_path / "store.lmdb"
        self.address = f"@gpuengine-test-{uuid.uuid4().hex}"
        self.sock = datagram_socket(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.stderr_path = tmp_path / f"{log}.err"
        args = ["serve", "--watch", str(self.dir), "--store", str(self.store), "--model",
                str(model), "--poll-interval", "0.1", "--settle", "1.0", "--status-interval",
                "0.3", "--retry-delay", "0", *extra]
        env = child_env(tmp_path, self.address)
        cmd = [sys.executable, "-m", "gpuengine", *args]
        if held:
            cmd = held_command(*args)
            env = held_env(env) if held is True else held_env(env, batches=held)
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def _read(self) -> None:
        """Drain the socket as systemd does (an unread queue would stall the sender)."""
        while not self.closed.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def wait_for_message(self, wanted: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(wanted in m for m in list(self.messages)):
                return
            if self.proc.poll() is not None:
                time.sleep(0.3)  # let the reader take what is queued
                if any(wanted in m for m in list(self.messages)):
                    return
                pytest.fail(f"the daemon exited ({self.proc.returncode}) before {wanted}:\n"
                            f"{self.stderr()}")
            time.sleep(0.05)
        pytest.fail(f"no {wanted} within {timeout} s:\n{self.stderr()}")

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                            f"{self.stderr()}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}:\n{self.stderr()}")

    def drop(self, name: str, data: bytes) -> None:
        """The documented way: write elsewhere on the filesystem, rename into inbox/."""
        staging = self.dir / "staging"
        staging.mkdir(exist_ok=True)
        (staging / name).write_bytes(data)
        time.sleep(0.02)
        os.replace(staging / name, self.dir / "inbox" / name)

    def in_done(self, name: str) -> bool:
        """The file and its job record are in done/ (the record is written first)."""
        done = self.dir / "done"
        return (done / name).exists() and (done / f"{name}.job.json").exists()

    def in_failed(self, name: str) -> bool:
        failed = self.dir / "failed"
        return (failed / name).exists() and (failed / f"{name}.error.json").exists()

    def status(self) -> dict:
        return json.loads((self.dir / "status.json").read_text())

    def job(self, name: str) -> dict:
        return json.loads((self.dir / "done" / f"{name}.job.json").read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.closed.set()
        self.reader.join(timeout=5)
        self.sock.close()


def fasta_bytes(prefix: str, n: int, seed: int, lengths=None) -> tuple[bytes, list[str], list[str]]:
    lengths = lengths or [8 + (i * 13) % 40 for i in range(n)]
    seqs = random_proteins(lengths, seed=seed)
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    text = "".join(f">{rid} some description\n{seq}\n" for rid, seq in zip(ids, seqs))
    return text.encode(), ids, seqs


def store_ids(store: Path) -> list[str]:
    from gpuengine import EmbeddingStore

    with EmbeddingStore(store) as emb:
        return list(emb)


def store_counts(store: Path) -> tuple[int, int, int]:
    """(record ids, embeddings, run records) of the default table."""
    from gpuengine import EmbeddingStore

    with EmbeddingStore(store) as emb:
        table = emb.info()["tables"]["default"]
        return table["records"], table["embeddings"], len(emb.runs())
