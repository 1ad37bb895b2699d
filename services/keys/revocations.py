"""Key changes (revocations) pushed to every replica by Postgres LISTEN/NOTIFY.

A trigger on `api_keys` (migration 0002) notifies `CHANNEL` with the key id
inside the revoking transaction, so the notice leaves exactly when the
revocation commits, whoever wrote it. The listening connection and its
recovery are services/db/notify.py's; while it is not known to be alive,
`healthy` is False and callers must not trust their key cache.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.db.notify import NotifyListener

log = structlog.get_logger("keys.revocations")

# Also named in services/db/migrations/0002_signin_sessions_demo.sql.
CHANNEL = "mp_api_key_changed"
# How the listening connection shows in pg_stat_activity.
APPLICATION_NAME = "mp-key-revocations"


class RevocationListener(NotifyListener):
    def __init__(
        self,
        dsn: str,
        *,
        on_change: Callable[[int], None],
        on_reset: Callable[[], None],
        probe_interval_s: float = 5.0,
        retry_s: float = 0.5,
        ready_timeout_s: float = 10.0,
    ) -> None:
        def on_notice(payload: str) -> None:
            try:
                key_id = int(payload)
            except ValueError:
                log.warning("revocation_notice_unreadable")
                on_reset()  # forget everything rather than keep a key that may be revoked
                return
            on_change(key_id)

        super().__init__(
            dsn,
            CHANNEL,
            on_notice=on_notice,
            on_reset=on_reset,
            application_name=APPLICATION_NAME,
            probe_interval_s=probe_interval_s,
            retry_s=retry_s,
            ready_timeout_s=ready_timeout_s,
        )
