"""Free TCP port lookup for the local launchers."""

from __future__ import annotations

import socket
from collections.abc import Collection


def free_port(host: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
    """Return a TCP port on `host` that nothing is listening on right now.

    The kernel picks it (bind to port 0). There is an unavoidable race between
    closing our socket and the child binding the port; callers detect a lost
    race because the child then fails to start and its readiness check fails.
    `avoid`: ports already promised to something that is not listening yet (e.g. the
    control plane's MP_PORT while Postgres and NATS start first).
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port
