"""Metering on the request path: reserve before dispatch, settle however the request ends.

Requests are admitted from this replica's quota leases (services/usage/leases.py),
in memory; their reservation rows and their settlements are written in batches
(services/usage/batch.py), so one busy account costs no more than many.

Each replica keeps only the reservations it opened (soft state). It reports
their progress to Postgres every couple of seconds, so if the replica dies its
reservations go stale and any other replica settles them with the tokens they
had reached: nothing is lost, and the ledger's request-id key means nothing is
counted twice. A whole (non-stream) answer has no reservation row while it runs:
nothing of it reaches the buyer before its settlement is stored, so with the usage
stream its reservation goes with its settlement (usage_events.Whole), and a replica
that dies first leaves it to its lease, which goes back to the subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import structlog

from schemas.tasks import cancel_and_wait
from schemas.usage_events import Closed, Opened, Settlement, Whole
from services.auth.principal import Principal
from services.db.refused import REFUSED
from services.errors import CoordinatorUnavailable, QuotaExhausted
from services.settings import Settings
from services.usage import leases, quotas
from services.usage.batch import GroupCommit
from services.usage.leases import Lease
from services.usage.quotas import Holder, Limits, Usage, today

if TYPE_CHECKING:
    from services.metrics.registry import Metrics
    from services.usage.ledger import UsageStream

log = structlog.get_logger("usage")

# A failed settlement is tried again with every touch (2 s) this many times (a Postgres restart or
# failover takes seconds); after that the reservation is left to a sweeper.
_SETTLE_TRIES = 60
# How long a refusal waits for settlements on their way through the usage stream, and how recent this
# replica's settlements of the subject must be for a refusal of requests or tokens to wait at all.
SETTLING_S = 2.0


class _Unsettled(NamedTuple):
    """A settlement that could not be stored yet, tried again from the touch loop."""

    settlement: Settlement
    ended: float
    tries: int
    # A whole answer's reservation (`Ticket.deferred`), which goes with it, and the lease that admitted it:
    # the request keeps its share there until its settlement is stored (or abandoned: then given back).
    deferred: Opened | None = None
    lease: Lease | None = None


class Opening:
    """A reservation's write under way: its outcome once known, and futures only for whoever waits before.

    Told in the call that learns it (the usage stream's acknowledgement, `UsageStream.send`): a future per
    request, and the `shield` its wait needed, were part of what metering cost a request, and the reservation
    is usually stored before the provider's first token comes.
    """

    __slots__ = ("_waiters", "outcome")

    def __init__(self) -> None:
        # True: stored; False: the lease's row no longer held the request; an exception: it could not be.
        self.outcome: bool | BaseException | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def __call__(self, error: BaseException | None) -> None:
        """`UsageStream.send`'s `done`."""
        self.resolve(True if error is None else error)

    def resolve(self, outcome: bool | BaseException) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = None

    @classmethod
    def of(cls, future: asyncio.Future[bool]) -> Opening:
        """The outcome of a write under way as a future (a group commit's)."""
        opening = cls()

        def told(f: asyncio.Future[bool]) -> None:
            opening.resolve(f.exception() or f.result() if not f.cancelled() else asyncio.CancelledError())

        future.add_done_callback(told)
        return opening

    @property
    def stored(self) -> bool:
        return self.outcome is True

    async def wait(self) -> bool:
        """The outcome: True or False, or its exception raised. A waiter cancelled cancels only its own wait."""
        if self.outcome is None:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome


@dataclass
class Ticket:
    """One request's reservation, updated by the gateway as frames arrive."""

    request_id: str
    holder: Holder
    model: str
    usage: Usage | None
    started: float = field(default_factory=time.monotonic)
    provider_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    settled: bool = False
    # A streamed answer reaches the buyer token by token; a whole one only at its end, so until
    # then nothing of it is the buyer's to pay for (what the touch loop reports for a sweeper).
    stream: bool = True
    # The lease it was admitted from (its slot goes back there), the tokens it holds, and the write of
    # its reservation row: under way while the request is dispatched (`Metering.confirm`).
    lease: Lease | None = None
    tokens: int = 0
    opening: Opening | None = None
    # A whole answer's reservation, not sent: it goes with the settlement, in one event (usage_events.Whole).
    deferred: Opened | None = None

    def delivered(self) -> tuple[int, int]:
        """(prompt, completion) tokens the buyer has had so far: what a sweeper bills if this replica dies."""
        return (self.prompt_tokens, self.completion_tokens) if self.stream else (0, 0)

    def headers(self) -> dict[str, str]:
        return rate_limit_headers(self.usage) if self.usage else {}


def rate_limit_headers(usage: Usage) -> dict[str, str]:
    reset = f"{usage.seconds_to_reset()}s"
    return {
        "x-ratelimit-limit-requests": str(usage.limits.requests_per_day),
        "x-ratelimit-remaining-requests": str(usage.requests_left),
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-tokens": str(usage.limits.tokens_per_day),
        "x-ratelimit-remaining-tokens": str(usage.tokens_left),
        "x-ratelimit-reset-tokens": reset,
    }


def default_limits(settings: Settings) -> Limits:
    return Limits(settings.quota_requests_per_day, settings.quota_tokens_per_day, settings.quota_concurrent)


def demo_limits(settings: Settings) -> Limits:
    return Limits(
        settings.demo_quota_requests_per_day, settings.demo_quota_tokens_per_day, settings.demo_quota_concurrent
    )


def holder_for(principal: Principal, settings: Settings) -> tuple[Holder, Limits]:
    """Who pays for a request and under which default limits: the account, or the demo token itself."""
    if principal.demo_token_id is not None:
        return Holder(f"d{principal.demo_token_id}", None, None, principal.demo_token_id), demo_limits(settings)
    assert principal.account_id is not None
    holder = Holder(f"a{principal.account_id}", principal.account_id, principal.key_id, None)
    return holder, default_limits(settings)


async def quota_headers(db: asyncpg.Pool, principal: Principal, settings: Settings) -> dict[str, str]:
    """x-ratelimit-* headers for responses that reserve nothing (models, usage, feedback)."""
    if not settings.metering:
        return {}
    holder, defaults = holder_for(principal, settings)
    return rate_limit_headers(await quotas.snapshot(db, holder, defaults))


def estimate_prompt_tokens(texts: list[str]) -> int:
    # The gateway has no tokenizer. BPE vocabularies average well over 3 bytes a
    # token on prose, so this overestimates a little; settlement uses the real count.
    return sum(len(t.encode()) // 3 + 8 for t in texts) + 8


class Metering:
    def __init__(
        self,
        db: asyncpg.Pool,
        gateway_id: str,
        *,
        enabled: bool = True,
        touch_interval_s: float = 2.0,
        stale_after_s: float = 30.0,
        metrics: Metrics | None = None,
        stream: UsageStream | None = None,
    ) -> None:
        self._db = db
        # Where reservations and settlements go: the usage stream (written to Postgres in batches by a
        # consumer, off the request path), or without one straight to Postgres (group commit).
        self._stream = stream
        self._gateway_id = gateway_id
        self.enabled = enabled
        # Often enough that this replica's rows never look stale to another replica (a quarter of the
        # time it declares it may stay silent).
        self._touch_interval_s = min(touch_interval_s, stale_after_s / 4)
        self._stale_after_s = stale_after_s
        self._open: dict[str, Ticket] = {}
        # Settlements that failed (Postgres unreachable), retried until they are written: left to the
        # sweeper, a request that ended would be settled from its last reported progress (the tokens it
        # delivered since then, often all of them, never billed). Bounded by the requests running when
        # Postgres went away: no new one is reserved without it.
        self._unsettled: dict[str, _Unsettled] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Settlements that run as tasks (`settling`), held: the loop keeps only weak references to tasks.
        self._settle_tasks: set[asyncio.Task[None]] = set()
        # Known from the first settlement on (asyncio.get_running_loop() is a getpid() system call on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Usage events in the stream not yet written to Postgres, as of the last sweep (a metric).
        self.unwritten_events = 0
        self._metrics = metrics
        self._leases: dict[str, Lease] = {}
        # Subject → the last busy spell of its lease given back idle (`Lease.remembered`); oldest first.
        self._spells: dict[str, int] = {}
        # A batch Postgres refuses for one item's values is written again item by item (batch.py).
        self._opener: GroupCommit[Opened, bool] = GroupCommit(
            lambda items: leases.open_many(db, gateway_id, items), split_on=REFUSED
        )
        self._closer: GroupCommit[Closed, tuple[bool, bool]] = GroupCommit(
            lambda items: leases.close_many(db, gateway_id, items), split_on=REFUSED
        )

    def open_count(self) -> int:
        """Reservations of requests running on this replica (for the metrics, read at scrape time)."""
        return len(self._open)

    def published(self) -> tuple[int, int]:
        """Messages stored in the usage stream, and the events they carried (metrics, at scrape time)."""
        if self._stream is None:
            return 0, 0
        return self._stream.publisher.messages, self._stream.publisher.events

    def oldest_open_s(self) -> float:
        if not self._open:
            return 0.0
        return time.monotonic() - min(t.started for t in self._open.values())

    async def start(self) -> None:
        if self.enabled and self._stream is not None:
            await self._stream.start()
        if self.enabled:
            self._tasks.append(asyncio.create_task(self._touch_loop(), name="metering-touch"))
            self._tasks.append(asyncio.create_task(self._sweep_loop(), name="metering-sweep"))

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)  # the sweep adopts orphans with nats-py fetches (schemas/tasks.py)
        # A last try before the process exits (a graceful stop settles what it served).
        await self._opener.drain()
        await self._closer.drain()
        await self._retry_unsettled()
        if self._stream is not None and self.enabled:
            # Everything this replica published is written before its leases go back.
            await self._stream.stop()
        for lease in list(self._leases.values()):
            with contextlib.suppress(Exception):
                await self._give_back(lease, lease.requests, lease.tokens, lease.slots)

    async def reserve(
        self, holder: Holder, limits: Limits, request_id: str, model: str, tokens: int, *, stream: bool = True
    ) -> Ticket:
        """Admit a request from this replica's lease (in memory) and start writing its reservation row.

        The row's write runs while the request is dispatched; `confirm` waits for it before anything
        of the answer reaches the buyer, so a replica that dies leaves every answered request's row.
        """
        if not self.enabled:
            return Ticket(request_id, holder, model, usage=None, stream=stream)
        whole = not stream and self._stream is not None
        if whole and self._unsettled:
            # Settlements are failing now (the usage stream cannot be reached). A whole answer's reservation
            # is tried only with its settlement, after its generation: none is started to go unrecorded
            # (a streamed request's own reservation fails in `confirm` meanwhile, as before).
            raise CoordinatorUnavailable("Usage could not be recorded just now; retry the request.")
        lease = await self._admit(holder, limits, tokens)
        ticket = Ticket(request_id, holder, model, lease.usage(), stream=stream, lease=lease, tokens=tokens)
        h = holder
        opening = Opened(request_id, h.subject, h.account_id, h.key_id, h.demo_token_id, model, lease.day, tokens)
        if whole:
            # Nothing of a whole answer reaches its buyer before its settlement is acknowledged: its
            # reservation goes with that (usage_events.Whole). Until then the lease's row holds the request,
            # and goes back to the subject if this replica dies: nothing was delivered, nothing is billed.
            ticket.deferred = opening
        elif self._stream is not None:
            # Sent at once: it leaves with the request's work message, in one socket write.
            ticket.opening = Opening()
            self._stream.send(opening, ticket.opening)
        else:
            ticket.opening = Opening.of(self._opener.submit(opening))
        self._open[request_id] = ticket
        return ticket

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until the usage events published so far are in Postgres (at once without a stream)."""
        if self._stream is None or not self.enabled:
            return True
        try:
            return await self._stream.caught_up(timeout_s)
        except Exception:
            return False

    async def confirm(self, ticket: Ticket) -> None:
        """Wait until the ticket's reservation row is written (raises if it could not be)."""
        opening = ticket.opening
        if opening is None or opening.stored:
            return
        try:
            opened = await opening.wait()
        except Exception as exc:
            log.warning("reservation_failed", request_id=ticket.request_id, error=type(exc).__name__)
            raise CoordinatorUnavailable("Usage could not be recorded just now; retry the request.") from None
        if not opened:
            # The lease's row no longer holds what memory says (another replica gave it back while this
            # one could not reach Postgres): forget it; the next request leases anew.
            assert ticket.lease is not None
            ticket.lease.requests = ticket.lease.tokens = ticket.lease.slots = 0
            raise CoordinatorUnavailable("This replica's quota lease was lost; retry the request.")

    async def _admit(self, holder: Holder, limits: Limits, tokens: int) -> Lease:
        """Take one request's share from this replica's lease of `holder`, leasing more when it is short."""
        lease = self._leases.get(holder.subject)
        if lease is None:
            lease = self._leases[holder.subject] = Lease(holder.subject, today(), limits)
            lease.remembered = self._spells.pop(holder.subject, 0)
        lease.holder, lease.last_tokens = holder, tokens
        retried = caught_up = False
        while True:
            now = time.monotonic()
            if lease.day != today():
                # A new UTC day: yesterday's requests and tokens are void (the subject's counters reset).
                lease.day, lease.requests, lease.tokens = today(), 0, 0
            fresh = now - lease.confirmed_at < self._stale_after_s / 2
            if fresh and lease.covers(tokens):
                lease.requests -= 1
                lease.tokens -= tokens
                lease.slots -= 1
                lease.in_use += 1
                if lease.in_use > lease.peak:
                    lease.peak = lease.in_use
                lease.admitted += 1
                lease.spell += 1
                lease.used_at = now
                return lease
            if lease.granting is not None:
                lease.waiters += 1
                try:
                    await asyncio.shield(lease.granting)
                finally:
                    lease.waiters -= 1
                continue
            refused = await self._grant(
                lease, holder, limits, tokens, leases.wanted(lease, tokens), _short_of(lease, tokens, fresh)
            )
            if refused is None or lease.covers(tokens):
                continue
            if not retried and (lease.requests or lease.tokens or lease.slots):
                # Part of what this request needs sits in our own lease, counted as taken: give it back
                # and ask once more, so a request is refused only when the subject truly has no room.
                retried = True
                await self._give_back(lease, lease.requests, lease.tokens, lease.slots)
                continue
            error, limit = _refusal(refused.usage, tokens)
            if not caught_up and self._settling(lease, limit):
                # What requests that just ended give back (a slot, a refunded request, unused tokens)
                # reaches the subject when their settlements are written by the usage stream's consumer,
                # within milliseconds: wait for those, then ask once more.
                caught_up = True
                await self._catch_up(lease)
                continue
            if self._metrics is not None:
                kind = "demo" if holder.demo_token_id is not None else "account"
                self._metrics.quota_rejections.labels(kind, limit).inc()
            raise error

    async def _grant(
        self, lease: Lease, holder: Holder, limits: Limits, tokens: int, want: tuple[int, int, int], short: str
    ) -> leases.Refused | None:
        """One grant statement for `lease`; requests short of it meanwhile wait for it (`Lease.granting`)."""
        lease.granting = asyncio.get_running_loop().create_future()
        if self._metrics is not None:
            self._metrics.lease_grants.labels(short).inc()
        try:
            return await leases.grant(
                self._db,
                lease,
                holder,
                limits,
                need_t=tokens,
                want=want,
                gw=self._gateway_id,
                stale_after_s=self._stale_after_s,
            )
        finally:
            granting, lease.granting = lease.granting, None
            granting.set_result(None)

    def _settling(self, lease: Lease, limit: str) -> bool:
        """Whether a refusal may be for settlements still on their way to Postgres: concurrency slots come
        back from any replica's requests; requests and tokens from this one's that settled lately."""
        if self._stream is None:
            return False
        return limit == "concurrent" or time.monotonic() - lease.settled_at < SETTLING_S

    async def _catch_up(self, lease: Lease) -> None:
        # One wait per subject at a time: a buyer sending many requests at its limit starts one, not many.
        assert self._stream is not None
        if lease.catching_up is None or lease.catching_up.done():
            lease.catching_up = asyncio.create_task(self._stream.caught_up(SETTLING_S))
        with contextlib.suppress(Exception):
            await asyncio.shield(lease.catching_up)

    @staticmethod
    def _unadmit(lease: Lease, tokens: int) -> None:
        lease.requests += 1
        lease.tokens += tokens
        lease.slots += 1
        lease.in_use -= 1

    def _remember(self, subject: str, spell: int) -> None:
        """The last busy spell of a lease given back idle, for the subject's next lease's first grant (bounded)."""
        self._spells.pop(subject, None)
        self._spells[subject] = min(spell, leases.REMEMBERED_MAX)
        if len(self._spells) > leases.REMEMBERED_SUBJECTS:
            del self._spells[next(iter(self._spells))]

    async def _give_back(self, lease: Lease, r: int, t: int, c: int) -> None:
        """Return part of a lease to its subject (taken from memory first, so nothing admits it meanwhile)."""
        r, t, c = min(r, lease.requests), min(t, lease.tokens), min(c, lease.slots)
        lease.requests -= r
        lease.tokens -= t
        lease.slots -= c
        try:
            given = await leases.give_back(self._db, self._gateway_id, lease, r, t, c)
        except Exception:
            given = False
        if not given:
            lease.requests += r
            lease.tokens += t
            lease.slots += c

    async def _maintain(self) -> None:
        """Keep this replica's leases alive, size them to their rates, give idle ones back."""
        started = time.monotonic()
        # Rows older than a quarter of the stale time are refreshed: none is older than half of it.
        alive = await leases.touch(self._db, self._gateway_id, self._stale_after_s / 4)
        forgotten = []
        short: list[Lease] = []
        for subject, lease in list(self._leases.items()):
            lease.rate = 0.5 * lease.rate + 0.5 * lease.admitted / self._touch_interval_s
            lease.admitted = 0
            if subject in alive:
                lease.confirmed_at = max(lease.confirmed_at, started)
            elif lease.confirmed_at < started and lease.granting is None:
                # Given back by another replica (this one looked dead): nothing of it is ours any more.
                lease.requests = lease.tokens = lease.slots = 0
            if lease.granting is not None:
                continue
            idle_s = time.monotonic() - lease.used_at
            # An idle lease stands by for its subject's next request (a buyer's next message, seconds later,
            # then takes no grant on its way) as long as a dead replica's lease would stay held, where the
            # subject has room enough that it keeps nobody out; otherwise it goes back after one tick.
            if idle_s > self._touch_interval_s:
                if lease.spell:
                    # The busy spell it served is over (what standing by is refilled for).
                    lease.last_spell, lease.spell = lease.spell, 0
                standing = idle_s <= self._stale_after_s and lease.in_use == 0 and lease.stands_by()
                if standing and not lease.ready():
                    short.append(lease)
            else:
                standing = True  # not idle: kept, its spare slots trimmed
            if not standing:
                await self._give_back(lease, lease.requests, lease.tokens, lease.slots)
                # Forgotten only if nothing started using it meanwhile (a grant now would be stranded).
                unused = lease.in_use == 0 and lease.granting is None and not lease.waiters
                if unused and not (lease.requests or lease.tokens or lease.slots):
                    del self._leases[subject]
                    forgotten.append(subject)
                    self._remember(subject, lease.last_spell)
            elif spare := lease.spare_slots():
                await self._give_back(lease, 0, 0, spare)
            lease.peak = lease.in_use
        await leases.forget_empty(self._db, self._gateway_id, forgotten)
        # Leases standing by that are short of one more request like their last: refilled here, off any
        # request's way, together (the pool bounds how many at once), the most lately used first and at most
        # REFILLS_PER_TICK a tick (a tick that ran long would delay the next touch).
        short.sort(key=lambda lease: lease.used_at, reverse=True)
        await asyncio.gather(*(self._refill(lease) for lease in short[:REFILLS_PER_TICK]))

    async def _refill(self, lease: Lease) -> None:
        holder = lease.holder
        if holder is None or lease.granting is not None or lease.in_use:
            return  # a request took it up meanwhile
        try:
            r, t, c = lease.standby()
            want = (max(1, r - lease.requests), max(lease.last_tokens, t - lease.tokens), c)
            refused = await self._grant(lease, holder, lease.limits, lease.last_tokens, want, "ahead")
        except Exception:
            refused = None
            log.warning("lease_refill_failed", subject=lease.subject)
        if refused is not None:
            # The subject has no room after all: the next tick gives the lease back instead.
            lease.holder = None

    async def settle(
        self,
        ticket: Ticket,
        *,
        outcome: str,
        cached_tokens: int = 0,
        ttft_ms: float | None = None,
        refund: bool = False,
    ) -> None:
        """Write the ledger row and release the reservation. Safe to call twice."""
        await self.settling(ticket, outcome=outcome, cached_tokens=cached_tokens, ttft_ms=ttft_ms, refund=refund)

    def settling(
        self,
        ticket: Ticket,
        *,
        outcome: str,
        cached_tokens: int = 0,
        ttft_ms: float | None = None,
        refund: bool = False,
    ) -> asyncio.Future[None]:
        """`settle`, under way: done once settled; it goes on if the caller stops waiting (a cancelled request).

        No task where the reservation is confirmed and the usage stream takes the settlement (every
        request that reached a provider): its acknowledgement's callback finishes it. A task per request
        for that was a visible share of metering's CPU.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if ticket.settled or not self.enabled:
            ticket.settled = True
            self._open.pop(ticket.request_id, None)
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        opening = ticket.opening
        if self._stream is None or (ticket.deferred is None and (opening is None or not opening.stored)):
            # A task (its reservation is awaited first), kept here: a caller that stops waiting cancels only
            # its own future, never the settlement.
            task = asyncio.ensure_future(
                self._settle(ticket, outcome=outcome, cached_tokens=cached_tokens, ttft_ms=ttft_ms, refund=refund)
            )
            self._settle_tasks.add(task)
            waited: asyncio.Future[None] = loop.create_future()

            def task_done(t: asyncio.Task[None]) -> None:
                self._settle_tasks.discard(t)
                if not t.cancelled() and (error := t.exception()) is not None:
                    log.error("settle_crashed", request_id=ticket.request_id, error=type(error).__name__)
                if not waited.done():
                    waited.set_result(None)

            task.add_done_callback(task_done)
            return waited
        ticket.settled = True
        self._open.pop(ticket.request_id, None)
        settlement, ended, closing = self._closing(ticket, outcome, cached_tokens, ttft_ms, refund)
        done = loop.create_future()
        deferred = ticket.deferred

        def published(error: BaseException | None) -> None:
            if error is not None:
                self._settle_failed(ticket, settlement, ended, error)
            else:
                # The consumer puts the slot where `keep_slot` says (the lease row, while it exists).
                self._settled(ticket, closing.keep_slot, refund, ended)
            if not done.done():  # a caller of `settle` that was cancelled cancelled it
                done.set_result(None)

        # Called in the same call as the acknowledgement's: the answer's end waits for `done`, with no loop
        # turn in between for a done callback.
        self._stream.send(closing if deferred is None else Whole(deferred, closing), published)
        return done

    async def _settle(
        self, ticket: Ticket, *, outcome: str, cached_tokens: int, ttft_ms: float | None, refund: bool
    ) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        self._open.pop(ticket.request_id, None)
        if ticket.opening is not None:
            try:
                opened: bool | None = await ticket.opening.wait()
            except Exception:
                opened = None
            if not opened and self._stream is not None:
                self._open_unconfirmed(ticket)
                return
            if not opened:
                # No row was written, so `confirm` failed and nothing reached the buyer: nothing to settle.
                if ticket.lease is not None:
                    if opened is None:
                        self._unadmit(ticket.lease, ticket.tokens)  # the lease row still holds it
                    else:
                        ticket.lease.in_use -= 1
                return
        settlement, ended, closing = self._closing(ticket, outcome, cached_tokens, ttft_ms, refund)
        try:
            if self._stream is not None:
                # (A whole answer's settlement never comes here: `settling` publishes it with its reservation.)
                await self._stream.publish(closing)
                # The consumer puts the slot where `keep_slot` says (the lease row, while it exists).
                to_lease = closing.keep_slot
            else:
                _, to_lease = await self._closer.submit(closing)
        except Exception as exc:
            self._settle_failed(ticket, settlement, ended, exc)
            return
        self._settled(ticket, to_lease, refund, ended)

    def _closing(
        self, ticket: Ticket, outcome: str, cached_tokens: int, ttft_ms: float | None, refund: bool
    ) -> tuple[Settlement, float, Closed]:
        ended = time.monotonic()
        settlement = Settlement(
            provider_id=ticket.provider_id,
            prompt_tokens=ticket.prompt_tokens,
            completion_tokens=ticket.completion_tokens,
            cached_tokens=cached_tokens,
            ttft_ms=ttft_ms,
            duration_ms=(ended - ticket.started) * 1000,
            outcome=outcome,
            refund=refund,
        )
        keep_slot = ticket.lease is not None and ticket.lease.keeps_slot()
        return settlement, ended, Closed(ticket.request_id, settlement, keep_slot=keep_slot)

    def _settled(self, ticket: Ticket, to_lease: bool, refund: bool, ended: float) -> None:
        """The settlement is stored: the lease takes back what the request did not use."""
        lease = ticket.lease
        if lease is not None:
            lease.in_use -= 1
            if to_lease:
                lease.slots += 1
            used = 0 if refund else ticket.prompt_tokens + ticket.completion_tokens
            lease.settled(max(0, ticket.tokens - used), refund)
        if self._metrics is not None:
            self._metrics.settlement_lag.observe(time.monotonic() - ended)

    def _settle_failed(self, ticket: Ticket, settlement: Settlement, ended: float, exc: BaseException) -> None:
        # Retried from the touch loop; only if this replica dies first does a sweeper settle it.
        if ticket.lease is not None and ticket.deferred is None:
            ticket.lease.in_use -= 1
        # A whole answer keeps its slot in use meanwhile: its lease must not be forgotten while its row holds it.
        lease = ticket.lease if ticket.deferred is not None else None
        self._unsettled[ticket.request_id] = _Unsettled(settlement, ended, 1, ticket.deferred, lease)
        log.warning("settle_failed", request_id=ticket.request_id, error=type(exc).__name__, retry=True)
        if self._metrics is not None:
            self._metrics.settle_failures.inc()

    def _open_unconfirmed(self, ticket: Ticket) -> None:
        """The reservation's publish failed (nothing reached the buyer). It may still have been stored
        (only the acknowledgement lost): a refund closes it then, its slot back to this lease as in memory."""
        assert self._stream is not None
        if ticket.lease is not None:
            ticket.lease.in_use -= 1
            ticket.lease.slots += 1
        refund = Settlement(ticket.provider_id, 0, 0, 0, None, None, "unconfirmed", refund=True)
        event = Closed(ticket.request_id, refund, keep_slot=True)
        task = asyncio.ensure_future(self._stream.publish(event))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _retry_unsettled(self) -> None:
        """Write the settlements that failed; one that keeps failing is left to the sweeper at last."""
        for request_id, (settlement, ended, tries, deferred, lease) in list(self._unsettled.items()):
            try:
                if self._stream is not None:
                    # Its slot went back to the subject (memory no longer counts it in the lease).
                    closing = Closed(request_id, settlement, keep_slot=False)
                    await self._stream.publish(closing if deferred is None else Whole(deferred, closing))
                else:
                    await quotas.settle(self._db, request_id, settlement)
            except Exception as exc:
                if tries >= _SETTLE_TRIES:
                    del self._unsettled[request_id]
                    log.error("settle_abandoned", request_id=request_id, error=type(exc).__name__, tries=tries)
                    if deferred is not None and lease is not None:
                        # Never stored: its share is still in the lease's row, so it goes back to the lease in
                        # memory, as if the request had not been admitted (no sweeper has a row to settle).
                        self._unadmit(lease, deferred.tokens)
                else:
                    self._unsettled[request_id] = _Unsettled(settlement, ended, tries + 1, deferred, lease)
                continue
            del self._unsettled[request_id]
            if lease is not None:
                lease.in_use -= 1
            log.info("settle_retried", request_id=request_id, tries=tries + 1)
            if self._metrics is not None:
                self._metrics.settlement_lag.observe(time.monotonic() - ended)

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._touch_interval_s)
            await self._retry_unsettled()
            # Whole answers have no reservation row yet (`Ticket.deferred`), and nothing delivered to report.
            running = [t for t in self._open.values() if t.deferred is None]
            progress = [(t.request_id, t.provider_id, *t.delivered()) for t in running]
            try:
                await quotas.touch(self._db, progress)
            except Exception:
                log.exception("reservation_touch_failed", open=len(progress))
            try:
                await self._maintain()
            except Exception:
                log.exception("lease_upkeep_failed", leases=len(self._leases))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self._stale_after_s / 4))
            try:
                busy: list[str] = []
                if self._stream is not None:
                    # A dead replica's events are written first; a replica whose events are not all
                    # written yet has none of its reservations swept (their settlements may be among them).
                    await self._stream.adopt_orphans()
                    backlog = await self._stream.backlog()
                    busy = list(backlog)
                    self.unwritten_events = sum(backlog.values())
                settled = await quotas.settle_stale(self._db, self._stale_after_s, exclude_gateways=busy)
                given = await leases.give_back_stale(self._db)
            except Exception:
                log.exception("reservation_sweep_failed")
                continue
            if settled:
                log.warning("stale_reservations_settled", count=settled)
                if self._metrics is not None:
                    self._metrics.stale_settled.inc(settled)
            if given:
                log.warning("stale_leases_given_back", subjects=given)


# How many leases standing by a maintenance tick refills at most (`Metering._maintain`).
REFILLS_PER_TICK = 256


def _short_of(lease: Lease, tokens: int, fresh: bool) -> str:
    """What a lease about to be granted more for a request lacks (the grant metric's label; "ahead" is a lease
    standing by, refilled at a maintenance tick)."""
    if not fresh:
        return "none"
    if lease.requests < 1:
        return "requests"
    if lease.tokens < tokens:
        return "tokens"
    return "slots" if lease.slots < 1 else "none"


def _refusal(usage: Usage, tokens: int) -> tuple[QuotaExhausted, str]:
    """The buyer's error, and which limit it hit (requests, tokens or concurrent)."""
    limits = usage.limits
    reset = usage.resets_at.strftime("%Y-%m-%d %H:%M UTC")
    if usage.requests + 1 > limits.requests_per_day:
        message = f"Daily request quota exhausted ({limits.requests_per_day} requests); it resets at {reset}."
        retry, limit = usage.seconds_to_reset(), "requests"
    elif usage.tokens + tokens > limits.tokens_per_day:
        message = (
            f"Daily token quota exhausted: this request may need up to {tokens} tokens and "
            f"{usage.tokens_left} of {limits.tokens_per_day} are left; it resets at {reset}. "
            "A smaller max_tokens may fit."
        )
        retry, limit = usage.seconds_to_reset(), "tokens"
    else:
        message = (
            f"Concurrent request quota exhausted ({limits.concurrent} at a time); retry when one of yours finishes."
        )
        retry, limit = 1, "concurrent"
    return QuotaExhausted(message, headers={**rate_limit_headers(usage), "retry-after": str(retry)}), limit
