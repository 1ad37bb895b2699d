"""Protocol violations by providers: counted, written in batches, and automatic suspension.

A gateway notes a violation on the request or heartbeat path with `record()`
(no I/O). Every `flush_s` a background task writes what accumulated in one
transaction: a flood of one kind from one provider becomes one row with an
occurrence count, so a hostile provider cannot turn its garbage into a write
load. The same transaction suspends each provider whose violations within
`window_s` reach `limit` (status 'suspended'); the providers trigger's notice
then withdraws it from every replica at once and fails over its running
requests (services/providers/admission.py treats 'suspended' like 'banned').

An honest daemon never violates the protocol: every check behind a violation
is an invariant the daemon keeps (see services/gateway/vetting.py), so a low
limit costs honest providers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
import structlog

from schemas.tasks import cancel_and_wait

log = structlog.get_logger("gateway.violations")

# Distinct (provider, kind) pairs held between two flushes; past this a flood is only counted.
_MAX_PENDING = 10_000
_MAX_DETAIL = 500


@dataclass(slots=True)
class _Pending:
    detail: str
    request_id: str | None
    occurrences: int = 1


_INSERT = """
INSERT INTO providers (provider_id, first_seen, last_seen)
SELECT DISTINCT id, now(), now() FROM unnest($1::text[]) AS id
ON CONFLICT (provider_id) DO NOTHING
"""

_RECORD = """
WITH v AS (
    INSERT INTO provider_violations (provider_id, kind, detail, request_id, occurrences, gateway_id)
    SELECT p, k, d, r, n, $6 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[]) AS t(p, k, d, r, n)
    RETURNING provider_id, kind, occurrences
), per AS (
    SELECT provider_id, sum(occurrences) AS n, max(kind) AS kind FROM v GROUP BY provider_id
)
UPDATE providers p SET violations = p.violations + per.n, last_violation = per.kind, last_violation_at = now()
  FROM per WHERE p.provider_id = per.provider_id
"""

_SUSPEND = """
UPDATE providers p
   SET status = 'suspended', updated_at = now(),
       note = 'suspended automatically: ' || w.n || ' protocol violations within '
              || round($3::float8)::bigint || ' s (last: ' || coalesce(p.last_violation, '?') || ')'
  FROM (SELECT provider_id, sum(occurrences) AS n FROM provider_violations
         WHERE provider_id = ANY($1::text[]) AND at > now() - make_interval(secs => $3::float8)
         GROUP BY provider_id) AS w
 WHERE p.provider_id = w.provider_id AND w.n >= $2 AND p.status NOT IN ('banned', 'suspended')
RETURNING p.provider_id, w.n
"""


class Violations:
    def __init__(
        self,
        db: asyncpg.Pool,
        gateway_id: str,
        *,
        limit: int,
        window_s: float,
        flush_s: float = 0.5,
    ) -> None:
        self._db = db
        self._gateway_id = gateway_id
        self.limit = limit
        self.window_s = window_s
        self._flush_s = flush_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._task: asyncio.Task[None] | None = None
        # Counted here whatever reaches Postgres (for logs and tests).
        self.counts: dict[str, int] = {}
        self.dropped = 0

    def record(self, provider_id: str, kind: str, detail: str, request_id: str | None = None) -> None:
        """Note a violation (no I/O): written at the next flush, floods coalesced."""
        self.counts[provider_id] = self.counts.get(provider_id, 0) + 1
        key = (provider_id, kind)
        pending = self._pending.get(key)
        if pending is not None:
            pending.occurrences += 1
            return
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1
            return
        self._pending[key] = _Pending(detail[:_MAX_DETAIL], request_id)
        log.warning("provider_violation", provider=provider_id, kind=kind, detail=detail[:200], request_id=request_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="provider-violations")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("violations_flush_failed", error=type(exc).__name__)

    async def flush(self) -> list[str]:
        """Write what accumulated; returns the providers suspended by it."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, {}
        # Sorted, so replicas lock provider rows in one order and never deadlock one another.
        items = sorted(batch.items())
        providers = [p for (p, _), _ in items]
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await conn.execute(_INSERT, providers)
                await conn.execute(
                    _RECORD,
                    providers,
                    [k for (_, k), _ in items],
                    [v.detail for _, v in items],
                    [v.request_id for _, v in items],
                    [v.occurrences for _, v in items],
                    self._gateway_id,
                )
                suspended = (
                    await conn.fetch(_SUSPEND, sorted(set(providers)), self.limit, self.window_s)
                    if self.limit > 0
                    else []
                )
        except Exception:
            # Put the batch back (merged with what came meanwhile) for the next flush.
            for key, value in batch.items():
                current = self._pending.get(key)
                if current is None:
                    self._pending[key] = value
                else:
                    current.occurrences += value.occurrences
            raise
        for row in suspended:
            log.warning("provider_suspended", provider=row["provider_id"], violations=int(row["n"]))
        return [row["provider_id"] for row in suspended]
