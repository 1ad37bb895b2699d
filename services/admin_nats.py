"""The operator's commands reach NATS as the control plane (NATS_URL, MP_NATS_USER, MP_NATS_PASSWORD)."""

from __future__ import annotations

from nats.aio.client import Client as Nats

from schemas import nats_direct, subjects
from services.settings import Settings


async def connect_as_control_plane(settings: Settings, *, timeout_s: float = 5.0) -> Nats:
    """One short-lived connection, no reconnects: a command fails fast and says so."""
    return await nats_direct.connect(
        settings.nats_url,
        user=settings.nats_user or None,
        password=settings.nats_password or None,
        allow_reconnect=False,
        connect_timeout=timeout_s,
        # Any request/reply (JetStream's too) answers on the only inbox the control plane may read.
        inbox_prefix=subjects.CONTROL_INBOX_PREFIX,
    )
