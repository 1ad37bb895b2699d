"""What keeps a web page out of the daemon's local APIs: one ASGI layer in front of both apps.

Binding 127.0.0.1 keeps the network out, not the browser on the same Mac: any page the
owner visits can send requests to 127.0.0.1, and a hostile domain that resolves to
127.0.0.1 (DNS rebinding) can even read the answers. So, before any route runs:

- `Host` must name loopback (127.0.0.1, localhost, [::1], with no port or the listening
  one): a rebinding page sends its own domain there (421).
- A browser request from any other origin is refused (403): `Origin` must be absent
  (curl, SDKs) or this server's own loopback origin (`null` is not), and
  `Sec-Fetch-Site`, when sent, must be `same-origin` or `none` (typed in the address bar).
- Anything with a body or a state-changing method must be `application/json` (415): a
  page can send `text/plain` or a form across sites without a CORS preflight, never JSON.
- With a token (the admin API), every path but `open_paths` needs
  `Authorization: Bearer <token>` (401), compared in constant time.
- A body must arrive within `body_timeout_s` of the headers (408) and be at most MAX_BODY
  bytes (413): a client trickling its body a byte at a time, or never sending what it
  announced, would hold a connection and a task as long as it liked. It is read here, and
  handed to the app whole.

No CORS headers are ever answered, so a page that gets a request through cannot read the
reply. Refusals are rendered by the app's own `render` (each API keeps its error envelope).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Loose on purpose: Litestar's own ASGI signature uses its narrower TypedDicts.
ASGIApp = Callable[..., Awaitable[None]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FETCH_SITES_OK = frozenset({b"same-origin", b"none"})


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str


Render = Callable[[Refusal], bytes]

BAD_HOST = Refusal(
    421,
    "host_not_allowed",
    "Refused: this local API answers only requests addressed to 127.0.0.1, localhost or [::1] "
    "(the Host header named something else, or was missing).",
)
CROSS_ORIGIN = Refusal(
    403,
    "cross_origin_refused",
    "Refused: this request came from a web page of another site; the daemon's local APIs "
    "serve only this Mac's own programs (curl, SDKs).",
)
NOT_JSON = Refusal(415, "unsupported_media_type", "Content-Type must be application/json.")
NO_TOKEN = Refusal(
    401,
    "missing_admin_token",
    "The admin API needs the admin token: send `Authorization: Bearer <token>` with the token "
    "from the daemon's admin token file (MP_ADMIN_TOKEN_FILE).",
)
BAD_TOKEN = Refusal(401, "invalid_admin_token", "Invalid admin token.")
# What Litestar itself accepts by default; the routes' own bounds (schemas/limits.py) are far smaller.
MAX_BODY = 10 * 1024 * 1024
TOO_LARGE = Refusal(413, "request_too_large", f"The request body is larger than the {MAX_BODY:,} bytes accepted.")


def _values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def _loopback_host(value: bytes, port: int | None) -> bool:
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name += "]"
        given = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and given is None:
            return False
    else:
        name, sep, given_port = host.partition(":")
        given = given_port if sep else None
    if name not in LOOPBACK_NAMES:
        return False
    return given is None or (given.isdigit() and port is not None and int(given) == port)


def _own_origins(port: int | None) -> frozenset[bytes]:
    suffix = "" if port in (None, 80) else f":{port}"
    return frozenset(f"http://{name}{suffix}".encode() for name in LOOPBACK_NAMES)


def _has_body(scope: Scope) -> bool:
    lengths = _values(scope, b"content-length")
    return bool(_values(scope, b"transfer-encoding")) or any(v.strip() not in (b"0", b"") for v in lengths)


def _is_json(values: list[bytes]) -> bool:
    return len(values) == 1 and values[0].split(b";", 1)[0].strip().lower() == b"application/json"


class LocalGuard:
    """ASGI middleware: the checks above, then the app; refusals never reach a route."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        render: Render,
        token: str | None = None,
        open_paths: frozenset[str] = frozenset(),
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.render = render
        self._token = token.encode() if token is not None else None
        self.open_paths = open_paths
        self.body_timeout_s = body_timeout_s

    def check(self, scope: Scope) -> Refusal | None:
        server = scope.get("server")
        port = server[1] if server else None
        hosts = _values(scope, b"host")
        if len(hosts) != 1 or not _loopback_host(hosts[0], port):
            return BAD_HOST
        origins = _values(scope, b"origin")
        if origins and (len(origins) > 1 or origins[0].strip().lower() not in _own_origins(port)):
            return CROSS_ORIGIN
        if any(v.strip().lower() not in _FETCH_SITES_OK for v in _values(scope, b"sec-fetch-site")):
            return CROSS_ORIGIN
        if self._token is not None and scope.get("path") not in self.open_paths:
            refusal = self._check_token(_values(scope, b"authorization"))
            if refusal is not None:
                return refusal
        if (scope.get("method") in _STATE_CHANGING or _has_body(scope)) and not _is_json(
            _values(scope, b"content-type")
        ):
            return NOT_JSON
        return None

    def _check_token(self, values: list[bytes]) -> Refusal | None:
        assert self._token is not None
        if not values:
            return NO_TOKEN
        scheme, _, credential = values[0].strip().partition(b" ")
        if len(values) > 1 or scheme.lower() != b"bearer":
            return BAD_TOKEN
        return None if hmac.compare_digest(credential.strip(), self._token) else BAD_TOKEN

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # No websocket routes here; a browser can open one across sites without CORS.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is not None:
            await self._refuse(send, refusal)
            return

        if _has_body(scope):
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client hung up
            if isinstance(body, Refusal):
                # The rest of the body may still come: the connection cannot carry another request.
                await self._refuse(send, body, close=True)
                return
            receive = _replay(body, receive)

        async def send_without_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v) for k, v in message.get("headers", ()) if not k.lower().startswith(b"access-control-")
                ]
            await send(message)

        await self.app(scope, receive, send_without_cors)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Refusal | None:
        """The whole body, or why not (None: the client hung up)."""
        lengths = _values(scope, b"content-length")
        if any(v.strip().isdigit() and int(v) > MAX_BODY for v in lengths):
            return TOO_LARGE
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > MAX_BODY:
                        return TOO_LARGE
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return Refusal(
                408, "body_timeout", f"The request body did not arrive within {self.body_timeout_s:g} s of its headers."
            )

    async def _refuse(self, send: Send, refusal: Refusal, *, close: bool = False) -> None:
        body = self.render(refusal)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="mac-provider-daemon admin"'))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` as the app expects it: the body read already, in one message, then the connection's own."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
