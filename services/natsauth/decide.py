"""Who a connection attempt is, from its CONNECT options: a provider, the control plane, or nobody.

- `auth_token` = a provider token (`mpp_`): live (not revoked), and its provider not
  banned or suspended (pending ones get in: admission is the gateway's business,
  at heartbeat time). It gets that provider's own subjects only.
- `user` + `pass` = the control plane's credential (MP_NATS_USER / MP_NATS_PASSWORD),
  compared in constant time. It gets the control plane's subjects.
- anything else is refused.

A token that is unknown or revoked stays so forever, so that answer is remembered
for a while (a banned provider's, for a few seconds): a shut-out daemon
reconnecting every half second costs no query. A stranger inventing tokens (their
checksum is public) would cost one query each: each client address has a budget
of failed look-ups per minute, past which its new tokens are refused unread.
Tokens that logged in lately skip the budget (they are still checked), so a Mac
reconnecting after a blip is never locked out by a flood from its own network.
Refusal reasons go to the server's log and ours: they never quote a credential.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog

from schemas.permissions import Permissions, control_plane_permissions, provider_permissions, provider_user
from services.auth.rate_limit import TokenBuckets
from services.keys.format import PROVIDER_TOKENS, digest
from services.natsauth.claims import ConnectOptions
from services.providers import tokens

log = structlog.get_logger("natsauth")

CONTROL_PLANE_USER = "control-plane"
# Statuses whose provider may not connect at all (the gateway never routes to them either).
_SHUT_OUT = ("banned", "suspended")
# What a CONNECT may carry before we look at it: a token is 40 characters, a password 43.
_MAX_USER = 128
_MAX_SECRET = 512


def _h(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True, slots=True)
class Grant:
    user: str  # the connection's NATS user name
    permissions: Permissions
    provider_id: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # safe to log: never a credential


class _Forgotten:
    """Digests of tokens found unknown or revoked, for `ttl_s`, at most `size` of them."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._size, self._ttl_s, self._clock = size, ttl_s, clock

    def __contains__(self, key: bytes) -> bool:
        until = self._entries.get(key)
        if until is None:
            return False
        if until < self._clock():
            del self._entries[key]
            return False
        return True

    def add(self, key: bytes) -> None:
        self._entries[key] = self._clock() + self._ttl_s
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Authorizer:
    def __init__(
        self,
        db: asyncpg.Pool,
        *,
        control_user: str,
        control_password: str,
        dead_token_ttl_s: float = 60.0,
        shut_out_ttl_s: float = 5.0,
        dead_token_cache: int = 10_000,
        failed_per_min: int = 30,
        max_clients: int = 50_000,
        known_token_ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        # An unset control-plane credential admits nobody (never "empty equals empty").
        self._control = (_h(control_user), _h(control_password)) if control_user else None
        self._dead = _Forgotten(dead_token_cache, dead_token_ttl_s, clock)
        # A banned provider's daemon retries every half second; an unban may take this long to count.
        self._shut = _Forgotten(dead_token_cache, shut_out_ttl_s, clock)
        self._failures = TokenBuckets(per_minute=failed_per_min, max_clients=max_clients, clock=clock)
        self._known = _Forgotten(dead_token_cache, known_token_ttl_s, clock)

    async def decide(self, opts: ConnectOptions, client: str = "") -> Grant | Refusal:
        """`client`: the connecting address as the server saw it (the key of its failed-login budget)."""
        if opts.auth_token:
            return await self._provider(opts.auth_token, client)
        if opts.user:
            return self._control_plane(opts.user, opts.password)
        return Refusal("no credentials")

    async def _provider(self, token: str, client: str) -> Grant | Refusal:
        if len(token) > _MAX_SECRET or not PROVIDER_TOKENS.well_formed(token):
            return Refusal("not a provider token")
        key = digest(token)
        if key in self._dead:
            return Refusal("unknown or revoked provider token")
        if key in self._shut:
            return Refusal("provider banned or suspended")
        known = key in self._known
        if not known and self._failures.take(client) is not None:
            return Refusal("too many failed logins from this address; retry in a minute")
        owner = await tokens.owner_of(self._db, token)
        if owner is None:
            self._dead.add(key)
            return Refusal("unknown or revoked provider token")
        if not known:
            self._failures.give_back(client)  # a real token, even a shut-out one, is no guess
        if owner.status in _SHUT_OUT:
            self._shut.add(key)
            return Refusal(f"provider {owner.provider_id} is {owner.status}")
        try:
            permissions = provider_permissions(owner.provider_id)
        except ValueError:  # an id an operator wrote by hand that cannot be a subject token
            return Refusal("provider id unusable on the bus")
        self._known.add(key)
        return Grant(provider_user(owner.provider_id), permissions, owner.provider_id)

    def _control_plane(self, user: str, password: str) -> Grant | Refusal:
        if self._control is None or len(user) > _MAX_USER or len(password) > _MAX_SECRET:
            return Refusal("unknown user or wrong password")
        want_user, want_password = self._control
        # Digests of equal length, both compared whatever the first says: the time taken tells nothing.
        same_user = hmac.compare_digest(_h(user), want_user)
        same_password = hmac.compare_digest(_h(password), want_password)
        if same_user and same_password:
            return Grant(CONTROL_PLANE_USER, control_plane_permissions())
        return Refusal("unknown user or wrong password")
