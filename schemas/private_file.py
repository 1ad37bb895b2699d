"""Writing a file that holds a secret: private (0600) from its first byte, and atomically.

The bytes go to a new temporary file opened with O_CREAT | O_EXCL and mode 0600,
so no other user can ever open it (O_EXCL: a file planted under that name by
someone else is never reused, whatever its mode); it is synced, then renamed over
the target (or linked to it, when the first writer must win). Writing first and
chmod-ing after leaves a window in which the secret is readable under the umask's
mode, and a reader who opened it then keeps it.

Reading one back refuses what may have leaked already: a symlink (it could point
anywhere), a file of another user, or one others can read.

Shared by the control plane (its generated secret key), the local stack (NATS
config, dev.env, admin.env) and the daemon (its admin token, its provider token).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

MODE = 0o600


def write_private(path: Path, data: str | bytes, *, replace: bool = True) -> None:
    """Write `data` to `path`, mode 0600, all or nothing.

    `replace=False` keeps an existing file (FileExistsError) so that, of several
    processes racing to create it, the first wins and the others read its content.
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class PrivateFileError(Exception):
    """The file cannot be used as a secret's home; the message says why and what to do."""


def read_private(path: Path, *, max_bytes: int, what: str) -> bytes:
    """The bytes of `path`, refused unless it is a private (no group/other access) regular file of this user."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        # ELOOP: a symlink, which could point anywhere (another user's file, a file anyone can read).
        raise PrivateFileError(f"cannot open the {what} {path}: {exc.strerror} (a symlink?)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"the {what} {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise PrivateFileError(
                f"the {what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): delete it"
            )
        if st.st_mode & 0o077:
            raise PrivateFileError(
                f"the {what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"run `chmod 600 {path}`, or delete it"
            )
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise PrivateFileError(f"the {what} {path} is larger than {max_bytes} bytes")
    return raw
