"""Filesystem events as a wake-up hint: Linux inotify through ctypes (no new dependency).

Polling stays the source of truth (``docs/daemon.md``); an event only ends the wait before
the next poll early, so a file renamed into ``inbox/`` is seen at once rather than up to one
poll interval later. Where inotify cannot see every write — NFS, SMB, Lustre, GPFS, Ceph, FUSE
and other network or cluster filesystems, where other hosts write — or where it is missing,
or when ``--poll`` is given, the waker just sleeps the poll interval.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
from pathlib import Path

log = logging.getLogger("gpuengine.daemon")

IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x4, 0x8, 0x80, 0x100
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph",
                       "glusterfs", "beegfs", "9p", "afs", "panfs", "wekafs")
SLICE = 0.25
"""Longest single wait, so a stop request is noticed quickly."""


def filesystem_type(directory: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding ``directory``, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(directory)
    best, best_type = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = line.split(" - ", 1)[1].split()[0]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type


def is_network_filesystem(fs_type: str | None) -> bool:
    return bool(fs_type) and (fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse"))


class Waker:
    """``wait(timeout, stop)``: sleep until ``timeout``, a stop request, or (with inotify) an
    event in the watched directory. :attr:`mode` says which, for the status file."""

    def __init__(self, directory: Path, *, force_poll: bool = False):
        self.fd: int | None = None
        fs_type = filesystem_type(directory)
        if force_poll:
            self.mode = "poll (--poll)"
        elif is_network_filesystem(fs_type):
            self.mode = f"poll ({fs_type}: other hosts' writes raise no inotify event)"
        else:
            self.mode = self._start_inotify(directory)
        log.info("watching %s: %s", directory, self.mode)

    def _start_inotify(self, directory: Path) -> str:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_ATTRIB
            if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
                os.close(fd)
                raise OSError(ctypes.get_errno(), "inotify_add_watch")
        except (OSError, AttributeError) as exc:
            return f"poll (inotify unavailable: {exc})"
        self.fd = fd
        return "inotify + poll"

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """True if an event ended the wait early."""
        remaining = timeout
        while remaining > 0 and not stop.is_set():
            step = min(SLICE, remaining)
            if self.fd is None:
                stop.wait(step)
            else:
                readable, _, _ = select.select([self.fd], [], [], step)
                if readable:
                    self._drain()
                    return True
            remaining -= step
        return False

    def _drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
