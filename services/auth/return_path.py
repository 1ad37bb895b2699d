"""Where a sign-in may send the browser back to: a few of our own pages, as same-site paths.

`/auth/github/start?next=…` keeps the path with the sign-in's state, and the callback
redirects there. Anything that is not one of these paths (a URL, `//host`, a
backslash, a control character, another page) is dropped, never followed: no open
redirect, whatever a link someone else made says.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

# Pages a sign-in may come back to, and the query parameters each keeps.
_ALLOWED = {"/device": ("user_code",), "/account": ()}
MAX_LENGTH = 512


def safe_return_path(raw: str | None) -> str | None:
    """`raw` rebuilt from its parts if it is one of our pages (with only its known parameters); else None."""
    if not raw or len(raw) > MAX_LENGTH or "\\" in raw or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in raw):
        return None
    if not raw.startswith("/") or raw.startswith("//"):
        return None
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or parts.path not in _ALLOWED:
        return None
    keep = _ALLOWED[parts.path]
    query = [(k, v) for k, v in parse_qsl(parts.query)[:8] if k in keep and len(v) <= 64]
    return parts.path + (f"?{urlencode(query)}" if query else "")
