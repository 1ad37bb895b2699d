"""The auth callout service's lifetime: its logins, its database pool, the responder and the disconnector.

It runs inside the control plane (`mac-provider serve`, before the gateway's own
NATS login, which it answers) or alone (`mac-provider serve --service natsauth`);
every replica answers any node of a cluster (a queue group).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import asyncpg
import structlog
from nats.aio.client import Client as Nats

from schemas import nats_direct
from services.db.pool import open_pool
from services.natsauth.decide import Authorizer
from services.natsauth.disconnect import Disconnector
from services.natsauth.keys import CurveKey, SigningKey
from services.natsauth.responder import Responder
from services.settings import Settings, SettingsError

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

log = structlog.get_logger("natsauth")


@dataclass
class NatsAuth:
    db: asyncpg.Pool
    nc: Nats  # the callout account's login
    sys_nc: Nats | None  # the system account's login (CONNZ / KICK), if configured
    responder: Responder
    started_at: float


def check_settings(settings: Settings) -> None:
    """Raises SettingsError unless the callout can run with these settings."""
    if not settings.nats_issuer_seed:
        raise SettingsError("the natsauth service needs MP_NATS_ISSUER_SEED (the auth_callout issuer's seed)")
    if not settings.nats_auth_user:
        raise SettingsError(
            "the natsauth service needs MP_NATS_AUTH_USER / MP_NATS_AUTH_PASSWORD (an auth_users login)"
        )


def control_plane_credential(settings: Settings) -> tuple[str, str]:
    """What the control plane logs in with: MP_NATS_USER / MP_NATS_PASSWORD, or else NATS_URL's user info.

    Every replica of the callout must agree on it (any of them answers any login), and the
    control plane of this very process logs in with it.
    """
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    first = settings.nats_url.split(",")[0]
    parts = urlsplit(first)
    if parts.username and parts.password is not None:
        return unquote(parts.username), unquote(parts.password)
    return "", ""


async def _login(settings: Settings, user: str, password: str, role: str) -> Nats:
    async def quiet(_: Exception) -> None:
        return None  # nats-py prints each reconnect error otherwise; the state shows in /health

    return await nats_direct.connect(
        settings.nats_url,
        name=f"mac-provider-natsauth-{role}-{settings.gateway_id}",
        user=user,
        password=password,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=quiet,
    )


@contextlib.asynccontextmanager
async def open_natsauth(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[NatsAuth]:
    check_settings(settings)
    issuer = SigningKey.from_seed(settings.nats_issuer_seed)
    xkey = CurveKey.from_seed(settings.nats_xkey_seed) if settings.nats_xkey_seed else None
    async with contextlib.AsyncExitStack() as stack:
        db = await open_pool(
            settings.database_url, size=settings.db_pool_size, run_migrations=settings.migrate_on_start
        )
        stack.push_async_callback(db.close)
        nc = await _login(settings, settings.nats_auth_user, settings.nats_auth_password, "callout")
        stack.push_async_callback(nc.drain)
        control_user, control_password = control_plane_credential(settings)
        authorizer = Authorizer(
            db,
            control_user=control_user,
            control_password=control_password,
            # The same budget as failed API-key look-ups (MP_FAILED_AUTH_PER_MIN), per connecting address.
            failed_per_min=settings.failed_auth_per_min,
            max_clients=settings.rate_limit_clients,
        )
        responder = Responder(
            nc, authorizer, issuer, xkey, settings.nats_account, settings.nats_user_ttl_s, metrics=metrics
        )
        await responder.start()
        stack.push_async_callback(responder.stop)
        sys_nc = None
        if settings.nats_sys_user:
            sys_nc = await _login(settings, settings.nats_sys_user, settings.nats_sys_password, "system")
            stack.push_async_callback(sys_nc.drain)
            disconnector = Disconnector(
                sys_nc, db, settings.database_url, account=settings.nats_account, recheck_s=settings.nats_recheck_s
            )
            await disconnector.start()
            stack.push_async_callback(disconnector.stop)
        else:
            log.warning("natsauth_no_system_login", effect="revocations and bans keep connected providers connected")
        log.info("natsauth_ready", issuer=issuer.public, account=settings.nats_account, sealed=xkey is not None)
        yield NatsAuth(db, nc, sys_nc, responder, time.time())
