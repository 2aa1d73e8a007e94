"""systemd's notify protocol (``Type=notify``) in the standard library, for ``gpuengine serve``.

One datagram of ``KEY=VALUE`` lines to the AF_UNIX socket systemd names in ``$NOTIFY_SOCKET``
(read by :mod:`gpuengine.config`; a leading ``@`` means the Linux abstract namespace). Without
it every call is a no-op,
so the daemon runs the same outside systemd. A failed send is logged and ignored: telling
systemd how we are must never stop the work.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)

SEND_TIMEOUT = 2.0


def notify(message: str, socket_path: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to ``socket_path``; True if a datagram was sent.
    An empty path means "not under systemd" (the environment is read by gpuengine.config)."""
    path = socket_path
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)  # a reader that stopped reading must not stall us
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc)
        return False
    return True
