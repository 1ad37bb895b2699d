"""The usage stream: settlement off the request path, durable, written to the ledger in batches.

Each gateway replica publishes its requests' usage events (schemas/usage_events.py)
to the JetStream stream on its own subject, and a request waits only for the
stream's acknowledgement: its reservation before any of its answer reaches the
buyer, its settlement before its response ends (a whole answer, which reaches
its buyer only at its end, sends both then, as one event). A durable consumer per replica
then writes them to Postgres in batches, in the order they were published (one
call for a batch's reservations and settlements), and acknowledges
them only once written: a consumer that dies leaves them to be delivered again,
and applying an event twice changes nothing (the reservation and the ledger row
are keyed by request id).

A replica that dies leaves its events in the stream. Its consumer, no longer
pulled, is removed by the server after `idle_s`; any other replica then adopts
the orphaned subject (under a Postgres advisory lock, so only one does) and
writes what is left. Until a replica's events are all written, its stale
reservations are not swept (`backlog`): a sweeper never bills a request from
its last reported progress while its real settlement is still on the way.

Under load a consumer takes a batch every `linger_s` (a transaction costs
Postgres about 0.4 ms whatever it holds). A replica that needs the ledger now
(`caught_up`: a quota refusal rechecked, a buyer reading their usage) says so on
LEDGER_HURRY, and every consumer writes what it holds at once: a concurrency
slot a request gave back on one replica reaches the next request on another
without waiting for the linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as Nats
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext

from schemas import nats_direct, subjects
from schemas.usage_events import ENCODER, Closed, Opened, UsageEvent, Whole, decode
from services.db.refused import REFUSED
from services.usage import leases
from services.usage.publisher import Publisher
from services.usage.pull import Delivery, Pull

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

log = structlog.get_logger("usage")

BATCH = 512
# How soon after its last batch a consumer asked to hurry (LEDGER_HURRY) takes the next: as often as
# before the linger grew to 50 ms, never more.
HURRIED_S = 0.02
# The most events one transaction writes (a message holds one event or a loop turn's several).
APPLY_MAX = 4096
# What the stream may hold by default (MP_USAGE_STREAM_MAX_MB) while no consumer writes it (Postgres
# down): past that, publishes fail and requests are refused (503) rather than served unbilled.
MAX_BYTES = 256 << 20
PUBLISH_TIMEOUT_S = 2.0
# How long a publish is tried again while the stream or the connection is unavailable (see `publish`).
PUBLISH_RETRY_S = 10.0
# What a retry may cure: no stream leader yet, no answer in time, the connection being re-established.
_UNAVAILABLE = (
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    TimeoutError,
)
# How long a starting replica waits for a clustered JetStream that cannot answer yet (a meta or stream
# leader being elected, a node still joining, a box too busy to answer in PUBLISH_TIMEOUT_S) before it
# gives up: CI saw a stream_info time out while three nodes and two replicas started at once.
START_WAIT_S = 30.0
# JetStream's own errors for "not now" (nats-server's jetstream_errors: incomplete results, no peers for
# placement yet, system temporarily unavailable, not the leader). Anything else, and 10039 (JetStream not
# enabled for the account), is a configuration to fix: said at once.
_NOT_YET = frozenset({10004, 10005, 10008, 10009})
# A pull waits this long for the next event (another follows at once): the server sees the consumer alive as
# long as it pulls.
PULL_WAIT_S = 2.0
# A drain (what the consumer has now) is answered at once; this long at most (a connection being re-made).
DRAIN_WAIT_S = 1.0
# A reader still waiting for the ledger asks the consumers again this often (`caught_up`); a hurry that came
# up to this long before a quiet consumer's next events still counts for them (the reader's own event may
# reach the consumer after its hurry does).
HURRY_AGAIN_S = 0.1
# A live consumer has a pull waiting except while it lingers (`linger_s`, the same on every replica of a
# deployment) or writes: one with none for longer than its linger and this is taken for gone (`caught_up`).
GONE_AFTER_S = 0.25


def _not_yet(exc: BaseException) -> bool:
    """A JetStream that may answer shortly: no answer in time, or one of its own "not now" errors."""
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in _NOT_YET


async def _until_ready(step: Callable[[], Awaitable[None]], deadline: float) -> None:
    """`step()`, again while JetStream says "not yet" and `deadline` has not passed (then its last error)."""
    pause = 0.1
    while True:
        try:
            return await step()
        except Exception as exc:
            if not _not_yet(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("usage_stream_not_ready", error=type(exc).__name__, code=getattr(exc, "err_code", None))
        await asyncio.sleep(pause)
        pause = min(1.0, pause * 2)


class UsageStreamUnavailable(RuntimeError):
    """The control plane cannot start: settlement through JetStream is configured but unusable."""


def _lock_key(gateway_id: str) -> str:
    return f"usage-ledger:{gateway_id}"


async def apply(db: asyncpg.Pool, gateway_id: str, events: Sequence[UsageEvent]) -> None:
    """Write one replica's events, in the order published, to Postgres (idempotent).

    A batch's reservations go first, then its settlements: a request opened and closed within the batch
    is then settled, and every other change commutes (migration 0016). A whole answer's event, and a request
    opened and closed within the batch, go straight to the ledger with what the reservation and settlement
    would have done (migration 0018). One call, one round trip, atomic.
    """
    # Reservations not settled in this batch, by request id (one delivered twice counts once).
    opened: dict[str, Opened] = {}
    closes: list[Closed] = []
    wholes: dict[dt.date, list[Whole]] = {}
    for e in events:
        if isinstance(e, Whole):
            wholes.setdefault(e.opened.day, []).append(e)
        elif isinstance(e, Opened):
            opened[e.request_id] = e
        elif (o := opened.pop(e.request_id, None)) is not None:
            # A request opened and closed within the batch (a stream that ended within the linger) is written
            # as a whole answer is: no reservations row in and out (migration 0018).
            wholes.setdefault(o.day, []).append(Whole(o, e))
        else:
            closes.append(e)
    opens = list(opened.values())
    by_day = leases.by_day(opens)
    days = sorted(by_day.keys() | wholes.keys())
    if len(days) <= 1:
        day = days[0] if days else None
        await leases.apply_many(db, gateway_id, day, opens, closes, wholes.get(day) if day else None)
        return
    # Reservations of two UTC days (a batch across midnight): one call per day, in one transaction, so
    # nobody sees a lease counter between them (migration 0014).
    async with db.acquire() as conn, conn.transaction():
        for i, day in enumerate(days):
            last = i == len(days) - 1
            await leases.apply_many(conn, gateway_id, day, by_day.get(day, []), closes if last else [], wholes.get(day))


class UsageStream:
    def __init__(
        self,
        nc: Nats,
        db: asyncpg.Pool,
        gateway_id: str,
        *,
        replicas: int = 1,
        linger_s: float = 0.1,
        idle_s: float = 30.0,
        max_bytes: int = MAX_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self._nc = nc
        self._db = db
        self._gw = gateway_id
        self._subject = subjects.usage_events(gateway_id)
        self._replicas = replicas
        self._linger_s = linger_s
        self._gone_after_s = linger_s + GONE_AFTER_S
        self._idle_s = max(5.0, idle_s)
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._js: JetStreamContext = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self.publisher = Publisher(nc, self._subject, PUBLISH_TIMEOUT_S)
        # This replica's consumer (services/usage/pull.py), and the task that pulls and writes its events.
        self._pull: Pull | None = None
        self._consuming: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # When a reader last waited for events to be written (here, or on another replica: LEDGER_HURRY): the
        # consumer stops lingering.
        self._hurried_at = -math.inf
        # Wakes the consumer: its first event after a quiet spell, a hurry, a stop, its consumer lost.
        self._wake = asyncio.Event()
        self._hurry_sub: Subscription | None = None
        # Other replicas' consumers seen with no pull waiting and no progress: since when, and their
        # progress then (see `adopt_orphans`).
        self._idle_seen: dict[str, tuple[float, tuple[int, int]]] = {}
        # Publishes whose first try failed, being tried again (`send`).
        self._retries: set[asyncio.Future[int]] = set()
        # Streamed requests' reservations held back by the last batch for the next (`_write`), and the
        # messages holding them, not acknowledged until then.
        self._held: list[tuple[Delivery, UsageEvent]] = []
        self._held_msgs: list[Delivery] = []

    # ---- publishing (the request path) -----------------------------------------------------

    def send(self, event: UsageEvent, done: Callable[[BaseException | None], None]) -> None:
        """Store one event in the stream, sent with this loop turn's others: `done(None)` once JetStream
        acknowledged it, `done(error)` if it could not be stored.

        Called in the acknowledgement's own call: no task, no future and no loop turn between JetStream's
        answer and what waits for it (an answer's end waits for its settlement so). A first try that fails
        as `publish` would try again is tried again by `publish`, in a task, for up to PUBLISH_RETRY_S more.
        """

        def answered(seq: int, error: BaseException | None) -> None:
            if error is None or not isinstance(error, _UNAVAILABLE):
                done(error)
                return
            retry = asyncio.ensure_future(self._retry(event))
            self._retries.add(retry)  # the loop holds tasks weakly
            retry.add_done_callback(lambda r: self._retried(r, done))

        self.publisher.send(ENCODER.encode(event), answered)

    def _retried(self, retry: asyncio.Future[int], done: Callable[[BaseException | None], None]) -> None:
        self._retries.discard(retry)
        done(asyncio.CancelledError() if retry.cancelled() else retry.exception())

    async def _retry(self, event: UsageEvent) -> int:
        await asyncio.sleep(0.02)
        return await self.publish(event)

    async def publish(self, event: UsageEvent, *, deadline: float | None = None) -> int:
        """Store one event in the stream; its sequence number once JetStream acknowledged it.

        While the stream has no leader (the NATS node that led it died: the others elect a new one in a
        few seconds) or the connection is being re-established, the publish is tried again for up to
        PUBLISH_RETRY_S (or until `deadline`, a time.monotonic()): the request waits instead of failing.
        A retry of a publish whose acknowledgement was lost stores the event twice, and writing it twice
        changes nothing.
        """
        deadline = time.monotonic() + PUBLISH_RETRY_S if deadline is None else deadline
        pause = 0.02
        while True:
            try:
                return await self.publisher.submit(ENCODER.encode(event))
            except _UNAVAILABLE:
                if time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(0.5, pause * 2)

    # ---- the stream and this replica's consumer --------------------------------------------

    async def start(self, *, wait_s: float = START_WAIT_S) -> None:
        """Make the stream (if missing) and this replica's consumer, waiting up to `wait_s` for a clustered
        JetStream still electing its leaders; then consume."""
        deadline = time.monotonic() + wait_s
        try:
            await _until_ready(self._ensure_stream, deadline)
            await self.publisher.start()
            self._hurry_sub = await nats_direct.subscribe(self._nc, subjects.LEDGER_HURRY, self._on_hurry)
            self._pull = Pull(self._nc, subjects.USAGE_STREAM, subjects.usage_consumer(self._gw), self._wake.set)
            await self._pull.start()
            await self._claim(deadline)
        except (nats.errors.Error, TimeoutError) as exc:
            # Say what to do, not just what nats-py saw (JetStream off in the account, a missing permission).
            raise UsageStreamUnavailable(
                f"the usage stream {subjects.USAGE_STREAM} cannot be reached or made ({type(exc).__name__}: {exc}). "
                "MP_SETTLEMENT=jetstream needs JetStream enabled in the NATS account the control plane is in "
                "('jetstream: enabled') and the control plane's permissions for it; or set MP_SETTLEMENT=postgres."
            ) from exc
        self._consuming = asyncio.create_task(self._consume(), name="usage-consumer")

    def _on_hurry(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self._hurried()

    def _hurried(self) -> None:
        """Someone waits for the events to be written: the consumer stops lingering."""
        self._hurried_at = time.monotonic()
        self._wake.set()

    async def stop(self) -> None:
        """Write what this replica published, then remove its consumer (a graceful stop leaves nothing)."""
        if self._consuming is None or self._pull is None:
            return
        # The consumer writes what it was delivered, without waiting for the rest of a linger.
        self._stopping.set()
        self._wake.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self._consuming, timeout=10.0)
        self._consuming = None
        pull, self._pull = self._pull, None
        pull.stop_polling()
        try:
            if self._held:
                await self._write(self._gw, [], pull)  # what the last batch held back
            while msgs := await pull.drain(BATCH, 0.2):
                await self._write(self._gw, msgs, pull)
            await self._until_applied(self._gw)
            await self._js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(self._gw))
        except Exception as exc:
            # Left in the stream: another replica adopts them once this consumer goes idle.
            log.warning("usage_drain_failed", error=type(exc).__name__)
        await pull.close()
        if self._hurry_sub is not None:
            with contextlib.suppress(Exception):
                await self._hurry_sub.unsubscribe()
            self._hurry_sub = None
        await self.publisher.stop()

    async def _claim(self, deadline: float) -> None:
        """Make this replica's consumer (if missing). An adoption of this replica's id still under way (its
        consumer went idle, or a restart with a fixed MP_GATEWAY_ID) finishes first: one reader at a time."""
        async with self._db.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtext($1))", _lock_key(self._gw))
            try:
                # A new clustered consumer answers 503 until its own leader is elected.
                await _until_ready(lambda: self._add_consumer(self._gw), deadline)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _lock_key(self._gw))

    async def _ensure_stream(self) -> None:
        config = api.StreamConfig(
            name=subjects.USAGE_STREAM,
            subjects=[subjects.ALL_USAGE_EVENTS],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            max_bytes=self._max_bytes,
            max_msg_size=64 * 1024,
            discard=api.DiscardPolicy.NEW,
        )
        try:
            current = (await self._js.stream_info(subjects.USAGE_STREAM)).config
        except nats.js.errors.NotFoundError:
            current = None
        if current is None:
            try:
                await self._js.add_stream(config)
                return
            except nats.js.errors.BadRequestError:
                pass  # another replica made it meanwhile
            current = (await self._js.stream_info(subjects.USAGE_STREAM)).config
        # Made by every replica at start: only a different config is sent (creating an existing stream
        # again counts its storage twice against the server's limit).
        if (current.num_replicas, current.max_bytes) != (config.num_replicas, config.max_bytes):
            await self._js.update_stream(config)

    async def _add_consumer(self, gateway_id: str) -> None:
        config = api.ConsumerConfig(
            durable_name=subjects.usage_consumer(gateway_id),
            filter_subject=subjects.usage_events(gateway_id),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=4 * BATCH,
            inactive_threshold=self._idle_s,
        )
        # Made, or left as it is when it exists with this config (as on every start of this replica).
        await self._js.add_consumer(subjects.USAGE_STREAM, config)

    async def _consume(self) -> None:
        """Write this replica's events: a long poll while idle, then a batch every `linger_s` while they keep
        coming (one wake-up and one write for many requests, not one per event in the middle of other
        requests' answers), the first one too. Those first events are the reservation of a request waiting
        for its first token (published with its work): written at once, at concurrency 1 they took 0.4 ms
        from each time to first token. Nothing is delivered while the consumer lingers (a delivery per
        event was a wake-up in the middle of a request each); what came meanwhile comes in one answer.
        A reader waiting for the events to be written (`caught_up`) cuts a linger short, to no less than
        HURRIED_S after the last batch.
        """
        assert self._pull is not None
        pull = self._pull
        loop = asyncio.get_running_loop()
        last = -math.inf
        busy = False
        while True:
            if self._stopping.is_set() and not pull.got:
                return  # what is left at the server, `stop` drains
            if pull.lost and not self._stopping.is_set():
                # The server removed this consumer (idle too long: a stalled loop, a long disconnection), or
                # a clustered stream has no leader for it yet: make it again.
                await asyncio.sleep(0.5)
                try:
                    await self._claim(time.monotonic())  # one try: this loop tries again
                except Exception as exc:
                    log.warning("usage_consumer_claim_failed", error=type(exc).__name__)
                    continue
                pull.lost, busy = False, False
                # The new consumer delivers again what this one was given and did not acknowledge.
                self._held, self._held_msgs = [], []
                continue
            # Batches following each other hold back reservations (`_write`); the first after a quiet spell
            # lingered for its settlements already, and a second linger without a pull waiting would look gone.
            following = busy
            if busy:
                start = last  # the next batch a linger after the last
            else:
                if not pull.got:
                    if not pull.polling:
                        pull.poll(1, PULL_WAIT_S)
                    await self._woken()
                    if not pull.got:
                        continue
                start = time.monotonic()  # the first events after a quiet spell
            hurried = False
            while not self._stopping.is_set():
                hurried = self._hurried_at > max(last, start - HURRY_AGAIN_S)
                # Hurried, no more often than every HURRIED_S: a buyer at their limit can have their refusal
                # rechecked many times a second, and each write costs Postgres about 0.4 ms.
                take_at = last + min(self._linger_s, HURRIED_S) if hurried else start + self._linger_s
                now = time.monotonic()
                if now >= take_at:
                    break
                await self._woken(take_at - now)
            last = time.monotonic()
            waiting = len(pull.got)
            msgs = await pull.drain(BATCH, DRAIN_WAIT_S)
            busy = len(msgs) > waiting
            if msgs or self._held:
                # A write that takes long (Postgres away) pulls meanwhile: the server would remove a consumer
                # nobody pulls for `idle_s`, and other replicas would take this one for gone.
                keep_alive = loop.call_later(PULL_WAIT_S, pull.poll, BATCH, PULL_WAIT_S)
                try:
                    hold = following and self._linger_s > 0 and not (hurried or self._stopping.is_set())
                    await self._write(self._gw, msgs, pull, hold=hold)
                finally:
                    keep_alive.cancel()
                    pull.stop_polling()
                # A batch that held reservations back takes the next a linger later, whatever comes meanwhile.
                busy = busy or bool(self._held)

    async def _woken(self, timeout_s: float | None = None) -> None:
        """Wait for the consumer's wake-up (`_wake`), or `timeout_s`."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _write(self, gateway_id: str, msgs: list[Delivery], pull: Pull, *, hold: bool = False) -> None:
        """Apply a batch, then acknowledge it; on failure nothing is acknowledged (all come again).

        An event that can never be written (it does not decode, or Postgres refuses what it holds) is
        parked in `usage_dead_letters` and the others are written: it must not hold up every settlement
        of its replica behind it, as it once did.

        With `hold` (this replica's own consumer, nobody waiting for the ledger, not stopping), a streamed
        request's reservation whose settlement is not in the batch waits for the next batch, a linger later,
        its message unacknowledged meanwhile (once: then it is written whatever came). A stream that ends
        by then is written as a whole answer is: one ledger row, instead of a reservations row inserted by
        one batch and deleted by the next (most of what Postgres spent on a stream longer than the linger's
        remainder: a quarter of the requests of 8-token-a-step streams at c=64, more for longer ones). The
        event is stored in the stream meanwhile, so a replica that dies leaves it to whoever adopts its
        events; the one thing that waits is the row its progress reports (every 2 s) update.
        """
        own = gateway_id == self._gw
        events: list[tuple[Delivery, UsageEvent]] = []
        earlier: list[Delivery] = []
        if own:
            events, self._held = self._held, []
            earlier, self._held_msgs = self._held_msgs, []
        undecodable: list[tuple[Delivery, str]] = []
        fresh: list[tuple[Delivery, UsageEvent]] = []
        for msg in msgs:
            try:
                fresh.extend((msg, event) for event in decode(msg.data))
            except Exception as exc:
                # Only the control plane can publish here; an event that does not decode never will.
                undecodable.append((msg, f"undecodable: {exc}"))
        if hold and own and fresh:
            fresh, held = _hold_lone_opens(events, fresh)
            if held:
                self._held = held
                self._held_msgs = list(dict.fromkeys(msg for msg, _ in held))
        events += fresh
        while True:
            try:
                for msg, why in undecodable:
                    await self._park(gateway_id, msg, why)
                # In parts of at most APPLY_MAX events, in order: a backlog pulled after Postgres was away
                # holds up to BATCH messages of many events each. A part that fails is written again with
                # the rest (writing one twice changes nothing).
                for start in range(0, len(events), APPLY_MAX):
                    part = events[start : start + APPLY_MAX]
                    try:
                        await apply(self._db, gateway_id, [e for _, e in part])
                    except REFUSED:
                        # One of them (or more) Postgres will never take: each alone, the refused ones parked.
                        await self._one_by_one(gateway_id, part)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self._stopping.is_set() and gateway_id == self._gw:
                    raise
                log.warning("usage_apply_failed", gateway_id=gateway_id, events=len(events), error=type(exc).__name__)
                if self._metrics is not None:
                    self._metrics.settle_failures.inc()
                await asyncio.sleep(1.0)
        # Written: each event goes from the stream (a work queue takes only explicit acknowledgements;
        # they leave together in one write to the server). A message holding a reservation held back is
        # acknowledged with the batch that writes it.
        if own and self._held_msgs:
            holding = {msg.reply for msg in self._held_msgs}
            msgs = [msg for msg in msgs if msg.reply not in holding]
        pull.ack(earlier + msgs)

    async def _one_by_one(self, gateway_id: str, events: list[tuple[Delivery, UsageEvent]]) -> None:
        """Write each event on its own, in order (writing one twice changes nothing); park the refused."""
        for msg, event in events:
            try:
                await apply(self._db, gateway_id, [event])
            except REFUSED as exc:
                # Its whole message is kept (once, however many of its events were refused): writing the
                # message's other events again changes nothing.
                await self._park(gateway_id, msg, f"{event.request_id}: {type(exc).__name__}: {exc}")

    async def _park(self, gateway_id: str, msg: Delivery, error: str) -> None:
        """Keep an event that cannot be written, byte for byte, for an operator (then it is acknowledged)."""
        seq = msg.stream_seq()
        status = await self._db.execute(
            # Parked once, however often its batch is tried again.
            "INSERT INTO usage_dead_letters (gateway_id, stream_seq, event, error) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (gateway_id, stream_seq) DO NOTHING",
            gateway_id,
            seq,
            msg.data,
            error[:2000],
        )
        if status == "INSERT 0 1":  # logged and counted once too
            log.error(
                "usage_event_parked", gateway_id=gateway_id, stream_seq=seq, size=len(msg.data), error=error[:300]
            )
            if self._metrics is not None:
                self._metrics.usage_events_parked.inc()

    # ---- what other replicas left --------------------------------------------------------------

    async def backlog(self) -> dict[str, int]:
        """Events not yet written, by the id of the replica that published them."""
        info = await self._js.stream_info(subjects.USAGE_STREAM, subjects_filter=subjects.ALL_USAGE_EVENTS)
        found = info.state.subjects or {}
        return {subject.rsplit(".", 1)[-1]: n for subject, n in found.items() if n}

    async def adopt_orphans(self) -> int:
        """Write the events of replicas that are gone; how many events.

        A live replica has a pull waiting at the server, or (busy, between two batches) makes progress:
        its consumer delivers and acknowledges events. One whose consumer does neither for `idle_s` is
        gone (or stalled that long: its events are then written by both, which changes nothing). Its
        consumer may hold events it was given and never acknowledged, and the server keeps such a
        consumer: the adopter removes it and reads the subject from its first event, in order.
        """
        now = time.monotonic()
        backlog = await self.backlog()
        for gateway_id in list(self._idle_seen):
            if gateway_id not in backlog:
                del self._idle_seen[gateway_id]
        written = 0
        for gateway_id in backlog:
            if gateway_id == self._gw or not subjects.valid_token(gateway_id):
                continue
            ci = await self._consumer(gateway_id)
            if ci is not None:
                progress = _progress(ci)
                seen = self._idle_seen.get(gateway_id)
                if ci.num_waiting or seen is None or seen[1] != progress:
                    self._idle_seen[gateway_id] = (now, progress)
                    continue
                if now - seen[0] < self._idle_s:
                    continue
            written += await self._adopt(gateway_id)
            self._idle_seen.pop(gateway_id, None)
        return written

    async def _until_applied(self, gateway_id: str, timeout_s: float = 2.0) -> None:
        """Wait until the server has applied the acknowledgements sent to `gateway_id`'s consumer: it takes
        them in a queue of the consumer's own, and a consumer deleted meanwhile drops what was still there
        (those events stay in the stream, to be written again by whoever reads the subject next)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ci = await self._consumer(gateway_id)
            if ci is None or not ci.num_ack_pending or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.01)

    async def _consumer(self, gateway_id: str) -> api.ConsumerInfo | None:
        try:
            return await self._js.consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
        except nats.js.errors.NotFoundError:
            return None

    async def _adopt(self, gateway_id: str) -> int:
        async with self._db.acquire() as conn:
            locked = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", _lock_key(gateway_id))
            if not locked:
                return 0  # another replica is at it
            try:
                ci = await self._consumer(gateway_id)
                if ci is not None:
                    if ci.num_waiting:
                        return 0  # pulled again: its replica is back
                    await self._js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                pull = Pull(self._nc, subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                await pull.start()
                written = 0
                try:
                    await self._add_consumer(gateway_id)
                    while msgs := await pull.drain(BATCH, 0.5):
                        await self._write(gateway_id, msgs, pull)
                        written += len(msgs)
                    await self._until_applied(gateway_id)
                finally:
                    await pull.close()
                    with contextlib.suppress(Exception):
                        await self._js.delete_consumer(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                log.warning("usage_events_adopted", gateway_id=gateway_id, events=written)
                return written
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", _lock_key(gateway_id))

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until every event published before now by a live replica is in Postgres (False: not
        within the timeout). A dead replica's events wait for adoption; nobody can hurry those."""
        deadline = time.monotonic() + timeout_s
        hurried = await self._hurry_all()
        info = await self._js.stream_info(subjects.USAGE_STREAM, subjects_filter=subjects.ALL_USAGE_EVENTS)
        last = info.state.last_seq
        for subject, count in (info.state.subjects or {}).items():
            gateway_id = subject.rsplit(".", 1)[-1]
            if not count or not subjects.valid_token(gateway_id):
                continue
            idle_since: float | None = None
            progress: tuple[int, int] | None = None
            while True:
                try:
                    ci = await self._js.consumer_info(subjects.USAGE_STREAM, subjects.usage_consumer(gateway_id))
                except nats.js.errors.NotFoundError:
                    break  # an orphan
                if _written_through(ci, last):
                    break
                now = time.monotonic()
                if ci.num_waiting or _progress(ci) != progress:
                    idle_since, progress = None, _progress(ci)
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since > self._gone_after_s:
                    # No pull waiting for longer than a linger: its replica is gone (a live one has one
                    # waiting but while it lingers), and the consumer only awaits removal and adoption.
                    # Nobody can hurry those. (Once taken for gone after 0.25 s, whatever the linger: a
                    # consumer lingering longer, not hurried, looked gone and was not waited for.)
                    break
                if now >= deadline:
                    return False
                if now - hurried >= HURRY_AGAIN_S:
                    # A hurry is a wake-up over core NATS (at most once), and a consumer may have taken it
                    # while the events waited for were not yet there for it to fetch: ask again.
                    hurried = await self._hurry_all()
                await asyncio.sleep(0.02)
        return True

    async def _hurry_all(self) -> float:
        """Every replica's consumer writes what it holds now (this one's too: the message comes back);
        when it was asked (time.monotonic())."""
        self._hurried()
        with contextlib.suppress(Exception):  # a wake-up, at best: the caller's wait is what counts
            if not nats_direct.publish_nowait(self._nc, subjects.LEDGER_HURRY, b""):
                await self._nc.publish(subjects.LEDGER_HURRY, b"")
        return time.monotonic()


def _hold_lone_opens(
    earlier: list[tuple[Delivery, UsageEvent]], fresh: list[tuple[Delivery, UsageEvent]]
) -> tuple[list[tuple[Delivery, UsageEvent]], list[tuple[Delivery, UsageEvent]]]:
    """`fresh` split into what to write now and the reservations to hold for the next batch: those whose
    settlement is in neither part of this batch (`earlier`: what the last batch held)."""
    closed = {e.request_id for _, e in earlier if isinstance(e, Closed)}
    closed.update(e.request_id for _, e in fresh if isinstance(e, Closed))
    now: list[tuple[Delivery, UsageEvent]] = []
    held: list[tuple[Delivery, UsageEvent]] = []
    for item in fresh:
        event = item[1]
        (held if isinstance(event, Opened) and event.request_id not in closed else now).append(item)
    return now, held


def _progress(ci: api.ConsumerInfo) -> tuple[int, int]:
    """How far a consumer has delivered and acknowledged (stream sequences): it moves while it works."""
    delivered = ci.delivered.stream_seq if ci.delivered is not None else 0
    acked = ci.ack_floor.stream_seq if ci.ack_floor is not None else 0
    return delivered or 0, acked or 0


def _written_through(ci: api.ConsumerInfo, seq: int) -> bool:
    """Whether a consumer has written (acknowledged) every event of its subject up to stream sequence `seq`."""
    floor = ci.ack_floor.stream_seq if ci.ack_floor is not None else 0
    if floor is not None and floor >= seq:
        return True
    delivered = ci.delivered.stream_seq if ci.delivered is not None else 0
    return not ci.num_ack_pending and (not ci.num_pending or (delivered or 0) >= seq)
