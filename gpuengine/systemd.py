"""systemd's notify protocol (``Type=notify``) in the standard library, for ``gpuengine serve``.

One datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a
leading ``@`` means the Linux abstract namespace). Without the variable every call is a no-op,
so the daemon runs the same outside systemd. A failed send is logged and ignored: telling
systemd how we are must never stop the work.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1\\nSTATUS=ready"``); True if a datagram was sent.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``; unset or empty means "not under systemd".
    """
    path = os.environ.get("NOTIFY_SOCKET", "") if socket_path is None else socket_path
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False
    return True
