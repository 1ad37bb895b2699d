"""What every child process of the daemon (the inference worker, the prepare helpers) does first.

A child reads no settings of its own from the environment: the daemon, which read them once
(daemon/settings.py), hands it what it needs on its command line (`log_args`).
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import BinaryIO

from schemas.logs import configure


def log_args(*, json: bool, level: str) -> list[str]:
    """The daemon's log settings, for a child's command line."""
    return ["--log-format", "json" if json else "console", "--log-level", level]


def add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("json", "console"), default="console")
    parser.add_argument("--log-level", default="info")


def become_child(args: argparse.Namespace) -> BinaryIO:
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
    configure(json=args.log_format == "json", level=args.log_level)
    return out
