"""What every child process of the daemon (the inference worker, the prepare helpers) does first."""

from __future__ import annotations

import os
import signal
from typing import BinaryIO

from schemas.logs import configure


def become_child() -> BinaryIO:
    """Set up a child process; returns the private stdout its protocol frames go to.

    Anything a library prints lands in the log instead (stdout becomes stderr). The daemon
    decides when a child stops: a Ctrl-C in its terminal, or a SIGTERM sent to its whole
    process group (systemd, `kill -- -pgid`), must not kill work it is still draining. It
    stops a child by closing its stdin or with a message, or with SIGKILL.
    """
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure(json=os.environ.get("MP_LOG_FORMAT", "console") == "json", level=os.environ.get("MP_LOG_LEVEL", "info"))
    return out
