"""The usage stream: settlement off the request path, durable, written to the ledger in batches.

Each gateway replica publishes its requests' usage events (schemas/usage_events.py)
to the JetStream stream on its own subject, and a request waits only for the
stream's acknowledgement: its reservation before any of its answer reaches the
buyer, its settlement before its response ends. A durable consumer per replica
then writes them to Postgres in batches, in the order they were published (one
statement for a batch's reservations, one for its settlements), and acknowledges
them only once written: a consumer that dies leaves them to be delivered again,
and applying an event twice changes nothing (the reservation and the ledger row
are keyed by request id).

A replica that dies leaves its events in the stream. Its consumer, no longer
pulled, is removed by the server after `idle_s`; any other replica then adopts
the orphaned subject (under a Postgres advisory lock, so only one does) and
writes what is left. Until a replica's events are all written, its stale
reservations are not swept (`backlog`): a sweeper never bills a request from
its last reported progress while its real settlement is still on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from schemas import subjects
from schemas.usage_events import DECODER, ENCODER, Closed, Opened, UsageEvent
from services.usage import leases
from services.usage.leases import Closing, Opening
from services.usage.quotas import Holder, Settlement

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

log = structlog.get_logger("usage")

BATCH = 512
# What the stream may hold while no consumer writes it (Postgres down): past that, publishes fail and
# requests are refused (503) rather than served unbilled.
MAX_BYTES = 1 << 30
# A lost acknowledgement is retried with the same message id within this window and stored once.
DUPLICATE_WINDOW_S = 120.0
PUBLISH_TIMEOUT_S = 2.0
# A pull waits this long for the next event; the server sees the consumer alive as long as it pulls.
PULL_WAIT_S = 5.0


def _lock_key(gateway_id: str) -> str:
    return f"usage-ledger:{gateway_id}"


def _opening(event: Opened) -> Opening:
    holder = Holder(event.subject, event.account_id, event.key_id, event.demo_token_id)
    return Opening(event.request_id, holder, event.model, event.tokens, event.day)


def _closing(event: Closed) -> Closing:
    settlement = Settlement(
        provider_id=event.provider_id,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_tokens=event.cached_tokens,
        ttft_ms=event.ttft_ms,
        duration_ms=event.duration_ms,
        outcome=event.outcome,
        refund=event.refund,
    )
    return Closing(event.request_id, settlement, keep_slot=event.keep_slot)


async def apply(db: asyncpg.Pool, gateway_id: str, events: Sequence[UsageEvent]) -> None:
    """Write one replica's events, in the order published, to Postgres (idempotent).

    A batch's reservations go first, then its settlements: a request opened and closed within the batch
    is then settled, and every other change commutes (services/usage/leases.py `_APPLY_OPEN`).
    """
    opens = [_opening(e) for e in events if isinstance(e, Opened)]
    closes = [_closing(e) for e in events if isinstance(e, Closed)]
    if not (opens and closes):
        # One statement: atomic on its own.
        if opens:
            await leases.apply_open_many(db, gateway_id, opens)
        if closes:
            await leases.close_many(db, gateway_id, closes)
        return
    # One transaction: nobody sees a lease counter between the two (migration 0014).
    async with db.acquire() as conn, conn.transaction():
        await leases.apply_open_many(conn, gateway_id, opens)
        await leases.close_many(conn, gateway_id, closes)


class UsageStream:
    def __init__(
        self,
        nc: Nats,
        db: asyncpg.Pool,
        gateway_id: str,
        *,
        replicas: int = 1,
        linger_s: float = 0.02,
        idle_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._nc = nc
        self._db = db
        self._gw = gateway_id
        self._subject = subjects.usage_events(gateway_id)
        self._replicas = replicas
        self._linger_s = linger_s
        self._idle_s = max(1.0, idle_s)
        self._metrics = metrics
        self._js: JetStreamContext = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # ---- publishing (the request path) -----------------------------------------------------

    async def publish(self, event: UsageEvent, msg_id: str) -> int:
        """Store one event in the stream; its sequence number once JetStream acknowledged it."""
        ack = await self._js.publish(
            self._subject,
            ENCODER.encode(event),
            timeout=PUBLISH_TIMEOUT_S,
            stream=subjects.USAGE_STREAM,
            headers={"Nats-Msg-Id": msg_id},
        )
        return ack.seq

    # ---- the stream and this replica's consumer --------------------------------------------

    async def start(self) -> None:
        await self._ensure_stream()
        # An adoption of this replica's id still under way (a restart with a fixed MP_GATEWAY_ID after
        # its consumer went idle) finishes first: never two readers of one subject at once.
        async with self._db.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtext($1))", _lock_key(self._gw))
            try:
                sub = await self._subscribe(self._gw)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _lock_key(self._gw))
        self._task = asyncio.create_task(self._consume(sub), name="usage-ledger")

    async def stop(self) -> None:
        """Write what this replica published, then remove its consumer (a graceful stop leaves nothing)."""
        if self._task is None:
            return
        self._stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), timeout=10.0)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _ensure_stream(self) -> None:
        config = api.StreamConfig(
            name=subjects.USAGE_STREAM,
            subjects=[subjects.ALL_USAGE_EVENTS],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_bytes=MAX_BYTES,
            max_msg_size=64 * 1024,
            discard=api.DiscardPolicy.NEW,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Already there with another config (an older release, or replicas changed): bring it in line.
            await self._js.update_stream(config)

    async def _subscribe(self, gateway_id: str) -> JetStreamContext.PullSubscription:
        config = api.ConsumerConfig(
            durable_name=subjects.usage_consumer(gateway_id),
            filter_subject=subjects.usage_events(gateway_id),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=4 * BATCH,
            inactive_threshold=self._idle_s,
        )
        return await self._js.pull_subscribe(
            subjects.usage_events(gateway_id),
            durable=config.durable_name,
            stream=subjects.USAGE_STREAM,
            config=config,
        )

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        try:
            while True:
                wait = 0.2 if self._stopping.is_set() else PULL_WAIT_S
                msgs = await self._fetch(sub, wait)
                if not msgs:
                    if self._stopping.is_set():
                        break
                    continue
                if self._linger_s and len(msgs) < BATCH and not self._stopping.is_set():
                    # Let a batch gather: one statement then carries many requests' events.
                    await asyncio.sleep(self._linger_s)
                    msgs += await self._fetch(sub, 0.0, BATCH - len(msgs))
                await self._write(self._gw, msgs)
        finally:
            with contextlib.suppress(Exception):
                if self._stopping.is_set():
                    await self._js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(self._gw))
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _fetch(self, sub: JetStreamContext.PullSubscription, wait_s: float, batch: int = BATCH) -> list[Msg]:
        try:
            return await sub.fetch(batch=batch, timeout=wait_s or 0.01)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.Error as exc:
            # Disconnected, or the consumer was removed: pull again shortly (the client reconnects).
            log.warning("usage_fetch_failed", error=type(exc).__name__)
            await asyncio.sleep(0.5)
            return []

    async def _write(self, gateway_id: str, msgs: list[Msg]) -> None:
        """Apply a batch, then acknowledge it; on failure nothing is acknowledged (all come again)."""
        events: list[UsageEvent] = []
        for msg in msgs:
            try:
                events.append(DECODER.decode(msg.data))
            except Exception:
                # Only the control plane can publish here; an event that does not decode never will.
                log.error("usage_event_undecodable", gateway_id=gateway_id, size=len(msg.data))
        started = time.monotonic()
        while True:
            try:
                await apply(self._db, gateway_id, events)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self._stopping.is_set() and gateway_id == self._gw:
                    raise
                log.warning("usage_apply_failed", gateway_id=gateway_id, events=len(events), error=type(exc).__name__)
                if self._metrics is not None:
                    self._metrics.settle_failures.inc()
                await asyncio.sleep(1.0)
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()
        if self._metrics is not None:
            self._metrics.settlement_lag.observe(time.monotonic() - started)

    # ---- what other replicas left --------------------------------------------------------------

    async def backlog(self) -> dict[str, int]:
        """Events not yet written, by the id of the replica that published them."""
        info = await self._js.stream_info(subjects.USAGE_STREAM, subjects_filter=subjects.ALL_USAGE_EVENTS)
        found = info.state.subjects or {}
        return {subject.rsplit(".", 1)[-1]: n for subject, n in found.items() if n}

    async def adopt_orphans(self) -> int:
        """Write the events of replicas whose consumers are gone (dead replicas); how many events."""
        written = 0
        for gateway_id in await self.backlog():
            if gateway_id == self._gw or not subjects.valid_token(gateway_id):
                continue
            written += await self._adopt(gateway_id)
        return written

    async def _adopt(self, gateway_id: str) -> int:
        async with self._db.acquire() as conn:
            locked = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", _lock_key(gateway_id))
            if not locked:
                return 0  # another replica is at it
            try:
                try:
                    await self._js.consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                    return 0  # still pulled by its replica (alive), or not yet idle long enough
                except nats.js.errors.NotFoundError:
                    pass
                sub = await self._subscribe(gateway_id)
                written = 0
                try:
                    while msgs := await self._fetch(sub, 0.5):
                        await self._write(gateway_id, msgs)
                        written += len(msgs)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    with contextlib.suppress(Exception):
                        await self._js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                log.warning("usage_events_adopted", gateway_id=gateway_id, events=written)
                return written
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _lock_key(gateway_id))

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until every event published before now is written to Postgres (False: not within timeout)."""
        deadline = time.monotonic() + timeout_s
        info = await self._js.stream_info(subjects.USAGE_STREAM)
        last = info.state.last_seq
        while True:
            if info.state.messages == 0 or info.state.first_seq > last:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
            info = await self._js.stream_info(subjects.USAGE_STREAM)
