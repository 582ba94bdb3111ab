"""Free loopback ports for services started by the test fixtures.

The kernel picks a free port when we bind port 0; we close the socket and hand the number to a
service that binds it a moment later. That leaves a small window in which another process on the
machine may take the port, so the service wrappers retry with a new port when the bind fails. What
we *can* rule out is handing the same number twice within one test run (two brokers in one test, a
broker's TLS and plain listeners): the kernel happily returns a port again once our probe socket is
closed, so every number handed out is remembered.
"""

from __future__ import annotations

import socket
import threading

LOOPBACK = "127.0.0.1"

_lock = threading.Lock()
_handed_out: set[int] = set()

# A handful of attempts is plenty: the kernel only repeats a port we handed out after cycling
# through its ephemeral range, or when most of the range is in use.
_MAX_ATTEMPTS = 64


def _probe() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # No SO_REUSEADDR: we want a port that nobody holds, not one another socket could share.
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and was not returned before in this process."""
    with _lock:
        for _ in range(_MAX_ATTEMPTS):
            port = _probe()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no fresh free port on {LOOPBACK} after {_MAX_ATTEMPTS} attempts")


def free_ports(count: int) -> list[int]:
    """Return `count` distinct free ports (see `free_port`)."""
    return [free_port() for _ in range(count)]


def is_listening(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True if a TCP connect to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
