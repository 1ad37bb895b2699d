"""Start, watch and stop the child processes the local stack owns.

Every child gets its own session (and so its own process group) so that
`stop()` can take down whatever it forked (e.g. PostgreSQL backends) with one
`killpg`, and so that a Ctrl-C in the parent's terminal is not delivered to the
children behind our back: we decide how they shut down.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# How often the wait loops re-check; short because local servers start in
# tens of milliseconds and tests wait on them.
POLL_INTERVAL = 0.02


class ProcessExitedError(RuntimeError):
    """A child we were waiting on exited before it became ready."""


class CommandError(RuntimeError):
    """A short-lived helper command (initdb, psql, ...) failed."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(f"{' '.join(self.argv)} exited with {returncode}:\n{output.strip()}")


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    """The last `lines` lines of a log file, or a note saying why there are none."""
    if log_path is None:
        return "(output was not captured)"
    try:
        # Only the end matters, and logs of long-lived servers can be large.
        with log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError as exc:
        return f"(cannot read {log_path}: {exc})"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or f"({log_path} is empty)"


def _credentials(user: str | None) -> dict[str, Any]:
    """Popen keyword arguments that run the child as `user`.

    Nothing to do when `user` is None or is who we already are. Otherwise we
    must be root; the primary group is set and root's supplementary groups are
    dropped too, or the child would keep root's group access.
    """
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    if entry.pw_uid == os.geteuid():
        return {}
    if os.geteuid() != 0:
        raise PermissionError(f"only root can run a child as {user!r}")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`.

    `log_path=None` leaves both inherited from us. The log is opened by us, not
    the child, so a child running as another user needs no rights on it; append
    mode keeps earlier runs and lets a server that also opens the same file
    itself (nats-server's log_file) interleave safely.
    """
    args = [os.fspath(a) for a in argv]
    if log_path is None:
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **_credentials(user),
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # A header makes each run easy to find in an appended log.
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {stamp} starting: {' '.join(args)}\n".encode())
        log.flush()
        # The child has its own copy of the descriptor; ours closes on exit.
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_credentials(user),
        )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short helper command to completion, capturing its output as text.

    Raises CommandError (carrying stdout and stderr) when it fails and `check`
    is true, so the caller's error says why rather than just an exit code.
    """
    args = [os.fspath(a) for a in argv]
    result = subprocess.run(
        args,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **_credentials(user),
    )
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.stdout + result.stderr)
    return result


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The group id is the child's pid (start_new_session). ESRCH just means
    # everyone in it is gone already.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` for `proc` to exit, leaving it unreaped if we can.

    While the child is an unreaped zombie its pid, which is also its process
    group id, cannot be handed to another process, so a following killpg
    cannot hit a stranger's group. Without os.waitid (older macOS Pythons)
    fall back to Popen.wait, which reaps.
    """
    if not hasattr(os, "waitid"):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # somebody else reaped it
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def stop(
    proc: subprocess.Popen[bytes],
    *,
    timeout: float = 10.0,
    sig: signal.Signals = signal.SIGTERM,
    group: bool = True,
) -> int:
    """Stop a child started by `spawn` and return its exit status.

    Sends `sig` to its whole process group (or only to the child itself when
    `group` is false, for servers like PostgreSQL that manage their own
    children and expect one signal to the leader), waits up to `timeout`
    seconds, then SIGKILLs the group. After a clean exit the group is swept
    with SIGKILL too, so no grandchild outlives the server. Calling it again,
    or on a child that already exited, is harmless.
    """
    if proc.returncode is None:
        if group:
            _signal_group(proc, sig)
        else:
            proc.send_signal(sig)
        if not _wait_exit(proc, timeout):
            _signal_group(proc, signal.SIGKILL)
        # Only sweep while the leader is unreaped: see _wait_exit.
        if proc.returncode is None:
            _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def check_alive(proc: subprocess.Popen[bytes] | None, log_path: Path | None, what: str) -> None:
    """Raise ProcessExitedError, quoting the log, if `proc` has exited."""
    if proc is None:
        return
    code = proc.poll()
    if code is not None:
        raise ProcessExitedError(f"{what} exited with status {code} while starting; log tail:\n{log_tail(log_path)}")


def wait_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until a TCP connect to host:port succeeds.

    With `proc`, fail fast with ProcessExitedError when it dies meanwhile
    (a wrong config or a taken port would otherwise cost the whole timeout).
    Raises TimeoutError after `timeout` seconds; both errors quote the tail
    of `log_path`.
    """
    what = f"process {proc.pid}" if proc is not None else f"server on {host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        check_alive(proc, log_path, what)
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what} did not accept connections on {host}:{port} within {timeout}s; log tail:\n{log_tail(log_path)}"
            )
        time.sleep(POLL_INTERVAL)
