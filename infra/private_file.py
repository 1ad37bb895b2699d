"""Writing a file that holds a secret: private (0600) from its first byte, and atomically.

The bytes go to a new temporary file opened with O_CREAT | O_EXCL and mode 0600,
so no other user can ever open it (O_EXCL: a file planted under that name by
someone else is never reused, whatever its mode); it is synced, then renamed over
the target (or linked to it, when the first writer must win). Writing first and
chmod-ing after leaves a window in which the secret is readable under the umask's
mode, and a reader who opened it then keeps it.

Shared by the control plane (its generated secret key) and the local stack
(NATS passwords and config, dev.env, admin.env). The daemon may not import this
package; it writes no secret today.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
