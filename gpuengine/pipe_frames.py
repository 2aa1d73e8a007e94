"""The frames gpuengine's child processes and the engine exchange over pipes (no pickle).

A frame is a 12-byte header, a 4-byte tag and the payload's size (``<4sQ``), then the payload.
The input processes (:mod:`gpuengine.inputs`, :mod:`gpuengine.input_workers`) and the store
writer process (:mod:`gpuengine.writer_process`) speak it; each names its own tags. An error
in a child travels as a ``FAIL`` frame of JSON (class name and message) and is raised again
in the engine as the same gpuengine error, so the user sees the message the code wrote; an
error of another kind is a bug and becomes an InternalError naming the child.

This module owns the framing only: what the payloads mean belongs to the modules that send them.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import traceback
from typing import BinaryIO, Callable, Mapping, Sequence

from gpuengine import errors
from gpuengine.errors import GpuEngineError, InternalError

FRAME = struct.Struct("<4sQ")
"""A frame's header: tag, payload size."""

PIPE_BYTES = 1 << 20
"""Each pipe to and from a child is asked for this much (a smaller one only costs wake-ups)."""
F_SETPIPE_SZ = 1031
"""Linux's fcntl command to size a pipe (``fcntl.F_SETPIPE_SZ`` on Python ≥ 3.10 on Linux)."""

GPUENGINE_ERRORS: Mapping[str, type[BaseException]] = {
    name: cls for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, GpuEngineError)}
"""The error classes a ``FAIL`` frame may name, by name (a child's own may add more)."""


def frame(tag: bytes, buffers: Sequence) -> list:
    """A frame as a header and the payload's buffers (for :func:`write_all`)."""
    size = sum(memoryview(b).nbytes for b in buffers)
    return [FRAME.pack(tag, size), *buffers]


def write_frame(out: BinaryIO, tag: bytes, payload: bytes) -> None:
    """One frame to a buffered file (flushing is the caller's)."""
    out.write(FRAME.pack(tag, len(payload)))
    out.write(payload)


def write_all(fd: int, buffers: Sequence) -> None:
    """Write every buffer to a pipe (``os.writev`` releases the GIL; a pipe may take less).
    The buffers go as they are (no copy); after a short write the next call starts at the
    first byte not written (a step per buffer written, never a shift of the list)."""
    views = [v for v in map(_byte_view, buffers) if v.nbytes]
    first, end = 0, len(views)
    while first < end:
        written = os.writev(fd, views[first:first + _IOV_MAX])
        while written:
            size = views[first].nbytes
            if written >= size:
                written -= size
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0


_IOV_MAX = 512
"""Buffers one ``writev`` takes at most (Linux's limit is 1024)."""


def _byte_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


def read_exact(fh: BinaryIO, size: int) -> bytearray | None:
    """``size`` bytes, None at a clean end of the stream (nothing read); EOFError inside them."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = fh.readinto(view[got:])
        if not n:
            if got == 0:
                return None
            raise EOFError(f"pipe closed after {got} of {size} bytes")
        got += n
    return buf


def read_frame(fh: BinaryIO) -> tuple[bytes, bytearray] | None:
    """The next (tag, payload), None when the stream ended between frames."""
    head = read_exact(fh, FRAME.size)
    if head is None:
        return None
    tag, size = FRAME.unpack(head)
    payload = read_exact(fh, size) if size else bytearray()
    if payload is None:
        raise EOFError("pipe closed before a frame's payload")
    return tag, payload


def error_payload(exc: BaseException, raisable: Mapping[str, type[BaseException]]) -> bytes:
    """A ``FAIL`` frame's payload for ``exc`` (a child's side). An error not in ``raisable``
    is a bug: its traceback goes to the child's stderr and only its one-line text travels."""
    if type(exc).__name__ in raisable and isinstance(exc, tuple(raisable.values())):
        data = {"class": type(exc).__name__, "message": str(exc)}
    else:
        data = {"class": None, "message": "".join(
            traceback.format_exception_only(type(exc), exc)).strip()}
        traceback.print_exc()
    return json.dumps(data).encode("utf-8")


def error_from(payload: bytes, raisable: Mapping[str, type[BaseException]],
               child: str) -> BaseException:
    """The exception a ``FAIL`` frame describes (the engine's side): the same class and
    message; another kind is a bug, an InternalError naming ``child``."""
    data = json.loads(bytes(payload).decode("utf-8"))
    cls = raisable.get(data.get("class"))
    if cls is None:
        return InternalError(f"the {child} failed: {data.get('message')}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, data.get("message", ""))
    return exc


def how_it_ended(proc: subprocess.Popen, running: str) -> str:
    """How a child that stopped answering ended, for the error that says so: ``running`` if it
    has not exited within 5 s, else the signal that killed it or its exit status."""
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return running
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"


def start_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a child that speaks frames on its stdin and stdout: this gpuengine importable
    (its package root first on ``PYTHONPATH``), ``env`` added to the environment, its own
    session (a Ctrl-C in the terminal reaches the engine only, which decides when the child
    stops), both pipes enlarged to :data:`PIPE_BYTES` where the system allows."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                             child_env.get("PYTHONPATH")]))
    child_env.update(env or {})
    proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0, env=child_env, start_new_session=True)
    for pipe in (proc.stdout, proc.stdin):
        try:
            import fcntl

            fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        except (OSError, ImportError):
            pass  # a smaller pipe only costs more wake-ups
    return proc


def close_pipes(proc: subprocess.Popen) -> None:
    """Close the engine's ends of a child's pipes (after it is reaped); idempotent."""
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass


def child_main(serve: Callable[[BinaryIO, BinaryIO], None], *, out_buffering: int = 1 << 20,
               raisable: Mapping[str, type[BaseException]] = GPUENGINE_ERRORS,
               setup: Callable[[], None] | None = None) -> int:
    """A child's life (its ``main``): :func:`child_streams`, ``setup()``, then ``serve(frames
    in, frames out)``; exit status 0 when it returns, 1 when the engine is gone (a broken
    pipe) or on an error, which goes to the engine as a ``FAIL`` frame (``raisable``: the
    classes the engine raises again by name) after what the child had written."""
    inp, out = child_streams(out_buffering)
    if setup is not None:
        setup()
    try:
        serve(inp, out)
    except BrokenPipeError:
        return 1  # the engine is gone
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, which raises it
        try:
            out.flush()
            write_all(out.fileno(), frame(b"FAIL", [error_payload(exc, raisable)]))
        except OSError:
            pass
        return 1
    return 0


def child_streams(out_buffering: int) -> tuple[BinaryIO, BinaryIO]:
    """A child's side: ignore SIGINT/SIGTERM (the engine decides when it stops), and return
    (frames in, frames out) on the original stdin/stdout, with stdout itself pointed at stderr
    so that a stray print cannot corrupt the frames."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=out_buffering)
    os.dup2(2, 1)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    return inp, out
