"""Answers the nats-server's auth callout on `$SYS.REQ.USER.AUTH` (a queue group: any replica answers).

Each request is opened (when the server seals it to our xkey), decoded and checked
(bounded, signed by the server that sent it, for our issuer, unexpired), then
decided (decide.py) and answered with a signed user JWT or an error, sealed back
when it came sealed. A request we cannot read gets no answer: the server then
refuses the connection when its auth timeout passes. Requests are answered
concurrently (a NATS restart reconnects every daemon at once), at most
`max_in_flight` at a time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import subjects
from services.natsauth import jwt, keys
from services.natsauth.claims import REQUEST_AUDIENCE, RequestClaims, response_claims, user_claims
from services.natsauth.decide import Authorizer, Grant, Refusal

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

log = structlog.get_logger("natsauth")

QUEUE = "mp-natsauth"
XKEY_HEADER = "Nats-Server-Xkey"
# A request holds the client's CONNECT options, which a stranger writes; ours are well under 4 KiB.
MAX_REQUEST_BYTES = 32 * 1024


@dataclass
class Responder:
    nc: Nats  # logged in to the callout account (one of auth_users)
    authorizer: Authorizer
    issuer: keys.SigningKey
    xkey: keys.CurveKey | None
    account: str  # where granted connections are placed
    ttl_s: float
    max_in_flight: int = 64
    metrics: Metrics | None = None
    _sub: Subscription | None = None
    _slots: asyncio.Semaphore = field(init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(subjects.AUTH_CALLOUT, queue=QUEUE, cb=self._on_request)
        await self.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        async with self._slots:
            started = time.perf_counter()
            try:
                answer = await self.answer(msg.data, (msg.headers or {}).get(XKEY_HEADER, ""), started)
            except Exception as exc:  # never let one request take the responder down
                log.error("nats_login_failed", error=type(exc).__name__)
                return
            if answer is not None and msg.reply:
                await self.nc.publish(msg.reply, answer)

    async def answer(self, data: bytes, server_xkey: str, started: float) -> bytes | None:
        """The bytes to answer a request with, or None when it cannot be answered."""
        out, decision, kind = await self._answer_counted(data, server_xkey, started)
        if self.metrics is not None:
            self.metrics.natsauth_decisions.labels(decision, kind).inc()
            self.metrics.natsauth_seconds.observe(time.perf_counter() - started)
        return out

    async def _answer_counted(self, data: bytes, server_xkey: str, started: float) -> tuple[bytes | None, str, str]:
        """(the answer, granted|refused|unreadable, who asked: provider|control_plane|none|unknown)."""
        unreadable = None, "unreadable", "unknown"
        if len(data) > MAX_REQUEST_BYTES + 64:
            log.warning("nats_login_unreadable", reason="request too large", size=len(data))
            return unreadable
        if server_xkey:
            if self.xkey is None:
                log.error("nats_login_unreadable", reason="sealed request but no MP_NATS_XKEY_SEED")
                return unreadable
            try:
                data = self.xkey.open(data, server_xkey)
            except keys.NkeyError as exc:
                log.warning("nats_login_unreadable", reason=str(exc))
                return unreadable
        try:
            claims = jwt.decode(data, RequestClaims, issuer_prefix=keys.PREFIX_SERVER, max_bytes=MAX_REQUEST_BYTES)
        except jwt.JwtError as exc:
            log.warning("nats_login_unreadable", reason=str(exc))
            return unreadable
        request = claims.nats
        problem = self._misaddressed(claims)
        if problem:
            log.warning("nats_login_unreadable", reason=problem, server=request.server_id.name[:64])
            return unreadable
        host = request.client_info.host[:64]
        client = {"client_host": host, "client_id": request.client_info.id}
        decision = await self.authorizer.decide(request.connect_opts, host)
        if isinstance(decision, Grant):
            user_jwt = jwt.encode(
                user_claims(
                    user_nkey=request.user_nkey,
                    account=self.account,
                    name=decision.user,
                    permissions=decision.permissions,
                    expires=self._expiry(decision),
                ),
                self.issuer,
            )
            reply = response_claims(user_nkey=request.user_nkey, server_id=request.server_id.id, jwt=user_jwt)
        else:
            reply = response_claims(user_nkey=request.user_nkey, server_id=request.server_id.id, error=decision.reason)
        out = jwt.encode(reply, self.issuer).encode()
        if server_xkey and self.xkey is not None:
            out = self.xkey.seal(out, server_xkey)
        ms = round((time.perf_counter() - started) * 1000, 2)
        if isinstance(decision, Refusal):
            log.warning("nats_login_refused", reason=decision.reason, ms=ms, **client)
        else:
            log.info("nats_login", user=decision.user, ms=ms, **client)
        opts = request.connect_opts
        kind = "provider" if opts.auth_token else "control_plane" if opts.user else "none"
        return out, "granted" if isinstance(decision, Grant) else "refused", kind

    def _expiry(self, grant: Grant) -> int:
        """When a provider's JWT expires, if MP_NATS_USER_TTL_S says so (0: never).

        The control plane's never does: its credential is a shared secret no re-check could
        revoke, and the server closing a gateway's connection would drop the frames streaming to it.
        """
        if grant.provider_id is None or self.ttl_s <= 0:
            return 0
        return int(time.time() + max(1.0, self.ttl_s))

    def _misaddressed(self, claims: RequestClaims) -> str:
        request = claims.nats
        if claims.aud != REQUEST_AUDIENCE or request.type not in ("", "authorization_request"):
            return "not an authorization request"
        if claims.sub != self.issuer.public:
            return "for another issuer (is auth_callout.issuer our MP_NATS_ISSUER_SEED's public key?)"
        if claims.iss != request.server_id.id:
            return "not signed by the server it names"
        if not keys.is_public(request.user_nkey, keys.PREFIX_USER):
            return "no user nkey"
        return ""
