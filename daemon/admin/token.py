"""The admin API's per-install bearer token, kept in a file only its owner can read.

The daemon makes it at first start; the owner's tools (`curl`, `mac-provider up`, the
tests) read it from the same file. The file is born private: created under a temporary
name with O_CREAT|O_EXCL and mode 0600 (never written and then chmod-ed, which would leave
a moment where others can read it), then hard-linked into place, which fails if another
daemon got there first, so a reader never sees a half-written token. A token file that
others could read, or that belongs to someone else, is refused rather than used.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

# Visible ASCII only, so it fits in a header as is; long enough not to be guessed.
_TOKEN = re.compile(r"[\x21-\x7e]{32,512}")
_MAX_BYTES = 4096


class AdminTokenError(Exception):
    """The token file cannot be used; the message says why and what to do."""


def read_admin_token(path: Path) -> str:
    """The token in `path`, refused unless it is a private regular file of this user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AdminTokenError(f"no admin token file at {path} (the daemon makes it when it starts)") from None
    except OSError as exc:
        # ELOOP: a symlink, which could point anywhere (another user's file, a file anyone can read).
        raise AdminTokenError(f"cannot open the admin token file {path}: {exc.strerror} (a symlink?)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdminTokenError(f"the admin token file {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise AdminTokenError(
                f"the admin token file {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                "delete it; the daemon makes a new one"
            )
        if st.st_mode & 0o077:
            raise AdminTokenError(
                f"the admin token file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"run `chmod 600 {path}`, or delete it and the daemon makes a new one"
            )
        raw = f.read(_MAX_BYTES + 1)
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _MAX_BYTES or not _TOKEN.fullmatch(token):
        raise AdminTokenError(
            f"the admin token file {path} holds no usable token (32-512 visible ASCII characters): "
            "delete it; the daemon makes a new one"
        )
    return token


def ensure_admin_token(path: Path) -> str:
    """The token in `path`, made first (atomically, 0600) if there is none yet."""
    if not os.path.lexists(path):
        _create(path)
    return read_admin_token(path)


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminTokenError(f"cannot make the folder for the admin token file {path}: {exc.strerror}") from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AdminTokenError(f"cannot create the admin token file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # Fails with EEXIST when another daemon sharing the folder made it first: use theirs.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as exc:
        raise AdminTokenError(f"cannot create the admin token file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
