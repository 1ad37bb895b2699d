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
from pathlib import Path

from schemas.private_file import PrivateFileError, read_private

# Visible ASCII only, so it fits in a header as is; long enough not to be guessed.
_TOKEN = re.compile(r"[\x21-\x7e]{32,512}")
_MAX_BYTES = 4096


class AdminTokenError(Exception):
    """The token file cannot be used; the message says why and what to do."""


def read_admin_token(path: Path) -> str:
    """The token in `path`, refused unless it is a private regular file of this user."""
    try:
        raw = read_private(path, max_bytes=_MAX_BYTES, what="admin token file")
    except FileNotFoundError:
        raise AdminTokenError(f"no admin token file at {path} (the daemon makes it when it starts)") from None
    except PrivateFileError as exc:
        raise AdminTokenError(f"{exc} (the daemon makes a new one)") from None
    token = raw.decode("ascii", errors="replace").strip()
    if not _TOKEN.fullmatch(token):
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
