"""Who may use which NATS subjects: the control plane, and each provider for its own subjects only.

Providers are other people's Macs, so NATS vouches for who is talking. A
provider may only receive its own work, cancels, drains and notices (and the pool-wide
probe), and only publish its own heartbeats, leaves and replies under its own
reply prefix, which also proves to the gateway who sent each frame. No
`_INBOX.>` and no wildcard over other providers: a provider never sees anyone
else's work or replies, and nothing of JetStream. The control plane (every gateway
replica and the admin CLI) sends work anywhere, reads heartbeats and replies, and
uses the usage-event stream (that one stream, nothing else of JetStream).

The NATS auth callout (services/natsauth/) puts these into the user JWT of each
connection it lets in. Every subject comes from `schemas.subjects`.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import subjects


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def control_plane_permissions() -> Permissions:
    """Also the usage-event stream (JetStream, that one stream only) and the control plane's own inbox,
    where its JetStream answers and pulled events arrive (it connects with CONTROL_INBOX_PREFIX)."""
    return Permissions(
        publish=(
            subjects.ALL_WORK,
            subjects.ALL_CANCELS,
            subjects.ALL_DRAINS,
            subjects.ALL_NOTICES,
            subjects.PROBE,
            subjects.ALL_USAGE_EVENTS,
            subjects.LEDGER_HURRY,
            *subjects.USAGE_JS_API,
            subjects.USAGE_JS_ACKS,
        ),
        subscribe=(
            subjects.HEARTBEATS,
            subjects.LEAVES,
            subjects.ALL_REPLIES,
            subjects.CONTROL_INBOXES,
            subjects.LEDGER_HURRY,
        ),
    )


def provider_permissions(provider_id: str) -> Permissions:
    """Raises ValueError if `provider_id` is not a valid subject token."""
    return Permissions(
        publish=(
            subjects.heartbeat(provider_id),
            subjects.leave(provider_id),
            subjects.provider_replies(provider_id),
        ),
        subscribe=(
            subjects.work(provider_id),
            subjects.cancel(provider_id),
            subjects.drain(provider_id),
            subjects.notices(provider_id),
            subjects.PROBE,
        ),
    )


PROVIDER_USER_PREFIX = "provider-"


def provider_user(provider_id: str) -> str:
    """The NATS user name of a provider's connections (what CONNZ finds them by)."""
    subjects.heartbeat(provider_id)  # validates the id
    return f"{PROVIDER_USER_PREFIX}{provider_id}"
