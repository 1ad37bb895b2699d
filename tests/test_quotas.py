"""Quotas and metering across gateway replicas, cancellations and a crashed gateway."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest

from infra.components import Child, DaemonChild, start_gateway, wait_model
from infra.nats import NatsServer
from infra.ports import free_port
from schemas import nats_direct, subjects
from schemas.usage_events import Closed, Opened, Settlement, UsageEvent, Whole
from services.errors import CoordinatorUnavailable
from services.metrics.registry import Metrics
from services.usage import leases, ledger
from services.usage import metering as metering_module
from services.usage.ledger import UsageStream, UsageStreamUnavailable
from services.usage.metering import Metering, Opening
from services.usage.quotas import Holder, Limits
from tests.support import logs
from tests.support.accounts import TestAccount, fetch, make_account, make_account_async, query
from tests.support.daemons import daemon_in_pool, spawn_daemon
from tests.support.ledger import written, written_async
from tests.support.stack import TINY_MODEL, Stack

SYNTHETIC = "synthetic-quota-model"


def _replica(stack: Stack, name: str, env: dict[str, str]) -> tuple[Child, str]:
    """Another gateway replica on the stack's NATS and Postgres: the process and its base URL."""
    port = free_port()
    child = start_gateway(stack.home, port=port, nats=stack.nats, database_url=stack.database_url, name=name, env=env)
    return child, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def synthetic_daemon(stack: Stack) -> Iterator[Child]:
    # The stand-in engine (never a model) answers instantly with many slots, so quota tests measure quotas.
    with daemon_in_pool(stack, provider_id="synthetic-quota", model_id=SYNTHETIC, engine="synthetic") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def replicas(stack: Stack, synthetic_daemon: Child) -> Iterator[list[str]]:
    """Four gateway replicas on one Postgres and one NATS.

    Quotas admit from memory (leases), so a burst the quota allows reaches the pool at once: each
    replica may use all 256 slots of the synthetic provider (the default cap on what one provider may
    claim is 64), so the pool never answers part of the burst 503.
    """
    started: list[Child] = []
    urls: list[str] = []
    try:
        for i in range(4):
            child, url = _replica(
                stack, f"gateway-replica-{i}", {"MP_RESERVATION_STALE_S": "2", "MP_PROVIDER_MAX_SLOTS": "256"}
            )
            started.append(child)
            urls.append(url)
        for url in urls:
            wait_model(url, SYNTHETIC, timeout=30)
        yield urls
    finally:
        for child in started:
            child.stop()


def _body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


async def test_four_replicas_never_overshoot_a_request_quota(stack: Stack, replicas: list[str]) -> None:
    account = await make_account_async(stack.database_url, requests_per_day=100, concurrent=1000)
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(url: str) -> httpx.Response:
            return await client.post(f"{url}/v1/chat/completions", json=_body(SYNTHETIC), headers=account.auth())

        responses = await asyncio.gather(*(one(url) for url, _ in zip(itertools.cycle(replicas), range(500))))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 100, 429: 400}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"quota_exhausted"}
    assert "100 requests" in refused[0].json()["error"]["message"]
    assert all(int(r.headers["retry-after"]) > 0 for r in refused)
    assert all(r.headers["x-ratelimit-remaining-requests"] == "0" for r in refused)
    assert all("x-ratelimit-limit-requests" in r.headers for r in responses)
    await written_async(stack.nats_url)
    ok_rows = await fetch(
        stack.database_url, "SELECT count(*) AS n FROM usage_ledger WHERE subject = $1", account.subject
    )
    assert ok_rows[0]["n"] == 100
    (usage,) = await fetch(
        stack.database_url,
        "SELECT requests, inflight, leased_requests FROM quota_usage WHERE subject = $1",
        account.subject,
    )
    assert (usage["requests"], usage["inflight"]) == (100, 0)
    # The replicas leased slices of the 100 and used every one: none is left parked in a lease.
    assert usage["leased_requests"] == 0
    leased = await fetch(
        stack.database_url,
        "SELECT coalesce(sum(requests), 0) AS n FROM quota_leases WHERE subject = $1",
        account.subject,
    )
    assert leased[0]["n"] == 0
    await _assert_leases_add_up(stack, account.subject)


async def _assert_leases_add_up(stack: Stack, subject: str) -> None:
    """What quota_usage counts as leased is exactly what the replicas' lease rows hold."""
    (row,) = await fetch(
        stack.database_url,
        "SELECT u.leased_requests, u.leased_tokens, u.leased_slots, "
        "coalesce(sum(l.requests), 0) AS r, coalesce(sum(l.tokens), 0) AS t, coalesce(sum(l.slots), 0) AS c "
        "FROM quota_usage u LEFT JOIN quota_leases l ON l.subject = u.subject AND l.window_day = u.window_day "
        "WHERE u.subject = $1 GROUP BY u.subject, u.leased_requests, u.leased_tokens, u.leased_slots",
        subject,
    )
    detail = await fetch(stack.database_url, "SELECT * FROM quota_leases WHERE subject = $1", subject)
    assert (row["leased_requests"], row["leased_tokens"], row["leased_slots"]) == (row["r"], row["t"], row["c"]), [
        dict(r) for r in detail
    ]


async def test_one_account_burst_is_served_from_a_lease_that_is_given_back(stack: Stack, replicas: list[str]) -> None:
    account = await make_account_async(stack.database_url, requests_per_day=1000, concurrent=100)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40), timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{replicas[1]}/v1/chat/completions", json=_body(SYNTHETIC), headers=account.auth())
                for _ in range(40)
            )
        )
    assert Counter(r.status_code for r in responses) == {200: 40}
    ids = {r.headers["x-request-id"] for r in responses}
    await written_async(stack.nats_url)
    rows = await fetch(stack.database_url, "SELECT request_id FROM usage_ledger WHERE subject = $1", account.subject)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    await _assert_leases_add_up(stack, account.subject)
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in responses)
    # What the buyer is told is left counts the requests admitted, not what the replica holds unused.
    assert remaining[0] >= 1000 - 40
    assert remaining[-1] < 1000
    # Idle for a moment, the replica gives back what it leased and did not use.
    deadline = time.monotonic() + 10
    while True:
        (usage,) = await fetch(
            stack.database_url,
            "SELECT requests, inflight, leased_requests, leased_tokens, leased_slots FROM quota_usage "
            "WHERE subject = $1",
            account.subject,
        )
        if usage["leased_requests"] == usage["leased_tokens"] == usage["leased_slots"] == 0:
            break
        assert time.monotonic() < deadline, dict(usage)
        await asyncio.sleep(0.2)
    assert (usage["requests"], usage["inflight"]) == (40, 0)
    assert await fetch(stack.database_url, "SELECT 1 FROM quota_leases WHERE subject = $1", account.subject) == []


def test_concurrency_quota(stack: Stack, synthetic_daemon: Child) -> None:
    account = make_account(stack.database_url, concurrent=1)
    long = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{stack.v1}/chat/completions", json=long, headers=account.auth(), timeout=60) as r:
        assert r.status_code == 200
        second = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=account.auth())
        assert second.status_code == 429
        assert "Concurrent" in second.json()["error"]["message"]
        assert second.headers["retry-after"] == "1"
    # The slot comes back once the stream is gone.
    deadline = time.monotonic() + 5
    while True:
        third = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=account.auth())
        if third.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert third.status_code == 200, third.text


@pytest.mark.parametrize(("concurrent", "spare"), [(16, 1), (3, 0)], ids=["room-to-spare", "near-the-limit"])
def test_one_request_after_another_keeps_a_spare_slot_only_when_the_subject_has_room(
    stack: Stack, synthetic_daemon: Child, concurrent: int, spare: int
) -> None:
    # A buyer's requests one after another: with room to spare, the replica keeps the slot of the one
    # that ended for the next (no lease statement per request); near the concurrency limit, every
    # slot goes back to the account at once, so another replica can use it.
    account = make_account(stack.database_url, concurrent=concurrent)
    for _ in range(5):
        r = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=account.auth())
        assert r.status_code == 200, r.text
    written(stack.nats_url)
    rows = query(stack.database_url, "SELECT slots FROM quota_leases WHERE subject = $1", account.subject)
    assert [row["slots"] for row in rows] == [spare]
    (usage,) = query(
        stack.database_url, "SELECT inflight, leased_slots FROM quota_usage WHERE subject = $1", account.subject
    )
    assert (usage["inflight"], usage["leased_slots"]) == (0, spare)
    # The spare slot is no room taken from the account: concurrent requests still get every slot.
    with ThreadPoolExecutor(concurrent) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=account.auth()),
                range(concurrent),
            )
        )
    assert sorted(r.status_code for r in answers) == [200] * concurrent


def test_token_quota_counts_what_was_generated(stack: Stack) -> None:
    account = make_account(stack.database_url, tokens_per_day=20_000)
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "story"}], "stream": True}
    seen_ids = []
    for max_tokens, read in ((3000, 10), (3000, 30), (5000, 3)):
        with httpx.stream(
            "POST", f"{stack.v1}/chat/completions", json={**body, "max_tokens": max_tokens}, headers=account.auth()
        ) as r:
            assert r.status_code == 200, r.read()
            seen_ids.append(r.headers["x-request-id"])
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks > read:
                    break
    for rid in seen_ids:
        logs.wait_event(stack.daemon.log_path, "request_done", request_id=rid)
    written(stack.nats_url)
    deadline = time.monotonic() + 5
    while query(stack.database_url, "SELECT 1 FROM reservations WHERE subject = $1", account.subject):
        assert time.monotonic() < deadline, "reservations left behind"
        time.sleep(0.05)
    rows = query(
        stack.database_url,
        "SELECT request_id, prompt_tokens, completion_tokens, outcome FROM usage_ledger WHERE subject = $1",
        account.subject,
    )
    assert {r["request_id"] for r in rows} == set(seen_ids)
    for row in rows:
        assert row["outcome"] == "cancelled"
        done = logs.wait_event(stack.daemon.log_path, "request_done", request_id=row["request_id"])
        # Billed: what reached the gateway, never more than the provider generated.
        assert 0 < row["completion_tokens"] <= int(done["completion_tokens"])
        assert row["completion_tokens"] < 1000
    (usage,) = query(stack.database_url, "SELECT tokens, inflight FROM quota_usage WHERE subject = $1", account.subject)
    assert usage["inflight"] == 0
    assert usage["tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    # A request that could need more tokens than are left is refused up front, saying so.
    big = httpx.post(
        f"{stack.v1}/chat/completions",
        json={"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 30_000},
        headers=account.auth(),
    )
    assert big.status_code == 429
    assert "token quota" in big.json()["error"]["message"]


def test_refused_requests_do_not_use_the_quota(stack: Stack) -> None:
    account = make_account(stack.database_url, requests_per_day=2)
    for _ in range(3):
        r = httpx.post(f"{stack.v1}/chat/completions", json=_body("not-served"), headers=account.auth())
        assert r.status_code == 503
    # The refunds reach the account's counters with their settlements (the usage stream, milliseconds later);
    # until then the remaining-requests header of the next answer may still count them.
    written(stack.nats_url)
    ok = httpx.post(f"{stack.v1}/chat/completions", json=_body(TINY_MODEL), headers=account.auth())
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    written(stack.nats_url)
    (usage,) = query(stack.database_url, "SELECT requests FROM quota_usage WHERE subject = $1", account.subject)
    assert usage["requests"] == 1
    outcomes = Counter(
        r["outcome"]
        for r in query(stack.database_url, "SELECT outcome FROM usage_ledger WHERE subject = $1", account.subject)
    )
    assert outcomes == {"unavailable": 3, "ok": 1}


def _in_flight(daemon: DaemonChild) -> int:
    r = httpx.get(f"{daemon.admin_url}/admin/status", headers=daemon.admin_headers(), timeout=10)
    assert r.status_code == 200, r.text
    return int(r.json()["requests"]["in_flight"])


def _progress(stack: Stack, account: TestAccount, condition: str) -> bool:
    """Whether the account's open reservation shows `condition` (what its gateway last reported)."""
    sql = f"SELECT 1 FROM reservations WHERE key_id = $1 AND {condition}"
    return bool(query(stack.database_url, sql, account.key_id))


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_killed_gateway_loses_no_usage(stack: Stack, replicas: list[str], stream: bool) -> None:
    """A streamed answer cut by its gateway's death is billed what reached the buyer (the progress last
    reported); a non-streamed one reached the buyer not at all, so it is billed nothing: it had no
    reservation row (its reservation goes with its settlement, usage_events.Whole), and the dead replica's
    lease, which held it, goes back to the account. The provider stops generating for the dead gateway,
    which said every 0.3 s that it was there while alive."""
    account = make_account(stack.database_url)
    model = f"tiny-llama-for-gateway-crash-{int(stream)}"
    daemon = spawn_daemon(
        stack.home, nats=stack.nats, provider_id=f"crash-mac-{int(stream)}", model_id=model, model_path=stack.model_path
    )
    # Configured as its peers: its leases count as abandoned 2 s after its last touch.
    doomed_id = f"gw-doomed-{secrets.token_hex(4)}"
    env = {"MP_RESERVATION_STALE_S": "2", "MP_GATEWAY_KEEPALIVE_MS": "300", "MP_GATEWAY_ID": doomed_id}
    doomed, base = _replica(stack, f"gateway-doomed-{int(stream)}", env)
    url = f"{base}/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30_000, "stream": stream}
    try:
        wait_model(base, model, timeout=60, daemon=daemon)
        if stream:
            with httpx.stream("POST", url, json=body, headers=account.auth(), timeout=30) as r:
                opened = time.monotonic()
                deadline, looked = opened + 20, 0.0
                for _ in r.iter_lines():
                    # Read on until the gateway has reported the buyer's progress at least once, and for
                    # longer than a live gateway's silence could last (3 intervals of 0.3 s): the provider
                    # keeps generating for a gateway that is there.
                    if time.monotonic() - looked > 0.1:
                        looked = time.monotonic()
                        if looked - opened > 1.5 and _progress(stack, account, "completion_tokens > 0"):
                            # Killed while the buyer still reads: leaving the loop closes the connection,
                            # and a gateway that saw the hang-up first would settle it as cancelled.
                            doomed.proc.send_signal(signal.SIGKILL)
                            doomed.proc.wait()
                            break
                        assert looked < deadline, "the gateway never reported progress"
                assert doomed.proc.poll() is not None, "the stream ended before the gateway was killed"
        else:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, url, json=body, headers=account.auth(), timeout=30)
                deadline = time.monotonic() + 30
                # Generating: the provider holds it (for longer than a live gateway's silence could last).
                while not _in_flight(daemon):
                    assert time.monotonic() < deadline, "the request never reached the provider"
                    time.sleep(0.05)
                time.sleep(1.0)
                assert _in_flight(daemon) == 1
                reserved = "SELECT 1 FROM reservations WHERE key_id = $1"
                assert query(stack.database_url, reserved, account.key_id) == [], "a whole answer's reservation row"
                doomed.proc.send_signal(signal.SIGKILL)
                doomed.proc.wait()
                with pytest.raises(httpx.HTTPError):
                    waiting.result()
        # Nobody will read the answer: the provider stops generating it (30,000 tokens) within a second
        # or two, not at its end (its drain would wait for it: 15 s when this test stopped the daemon).
        killed = time.monotonic()
        while _in_flight(daemon):
            assert time.monotonic() - killed < 5, "the provider generates on for a dead gateway"
            time.sleep(0.1)
        stopped = logs.wait_event(daemon.log_path, "gateway_lost_requests_stopped")
        assert (stopped["gateway"], str(stopped["requests"])) == (doomed_id, "1")
        if stream:
            # The replicas (stale after 2 s) settle the orphaned reservation.
            deadline = time.monotonic() + 15
            ledger = "SELECT * FROM usage_ledger WHERE key_id = $1"
            while not (rows := query(stack.database_url, ledger, account.key_id)):
                assert time.monotonic() < deadline, "the orphaned reservation was never settled"
                time.sleep(0.2)
            (row,) = rows
            assert row["outcome"] == "gateway_lost"
            assert row["completion_tokens"] > 0
            assert row["provider_id"] == "crash-mac-1"
        assert query(stack.database_url, "SELECT 1 FROM reservations WHERE key_id = $1", account.key_id) == []
        (usage,) = query(stack.database_url, "SELECT inflight FROM quota_usage WHERE subject = $1", account.subject)
        assert usage["inflight"] == 0
        # The dead replica's lease goes back to the account too (its peers give it back when it goes stale).
        deadline = time.monotonic() + 15
        leased = "SELECT leased_requests, leased_tokens, leased_slots FROM quota_usage WHERE subject = $1"
        while tuple(query(stack.database_url, leased, account.subject)[0]) != (0, 0, 0) or query(
            stack.database_url, "SELECT 1 FROM quota_leases WHERE subject = $1", account.subject
        ):
            assert time.monotonic() < deadline, "the dead replica's lease was never given back"
            time.sleep(0.2)
        day = "SELECT requests, tokens FROM quota_usage WHERE subject = $1"
        (usage,) = query(stack.database_url, day, account.subject)
        written = query(stack.database_url, "SELECT * FROM usage_ledger WHERE key_id = $1", account.key_id)
        if stream:
            # Settled once: the day's tokens are exactly the ledger row's (a second settlement would add more).
            assert usage["tokens"] == row["prompt_tokens"] + row["completion_tokens"]
            assert len(written) == 1
        else:
            # Nothing reached the buyer: nothing counts against the day, and nothing is in the ledger.
            assert (usage["requests"], usage["tokens"], written) == (0, 0, [])
    finally:
        doomed.stop()
        daemon.stop()


def test_a_gateway_killed_right_after_answering_loses_nothing_a_peer_writes_its_events(
    stack: Stack, replicas: list[str]
) -> None:
    """The settlement was in the usage stream (acknowledged before the answer ended) but not yet in Postgres
    when the replica died: a peer adopts its events and bills exactly what the buyer got. Meanwhile the
    reservation goes stale (2 s) and is not swept from its last progress: its settlement is on the way."""
    account = make_account(stack.database_url)
    # Its consumer writes the first event at once, then waits 200 ms for more: the settlement waits there.
    doomed, base = _replica(
        stack, "gateway-doomed-after", {"MP_RESERVATION_STALE_S": "2", "MP_LEDGER_LINGER_MS": "200"}
    )
    try:
        wait_model(base, SYNTHETIC, timeout=30)
        r = httpx.post(f"{base}/v1/chat/completions", json=_body(SYNTHETIC, max_tokens=9), headers=account.auth())
        assert r.status_code == 200, r.text
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
    finally:
        doomed.stop()
    rid = r.headers["x-request-id"]
    pending = query(stack.database_url, "SELECT 1 FROM usage_ledger WHERE request_id = $1", rid)
    assert pending == [], "written before the kill: nothing left to adopt (the linger is 200 ms)"
    deadline = time.monotonic() + 30
    while not (rows := query(stack.database_url, "SELECT * FROM usage_ledger WHERE request_id = $1", rid)):
        assert time.monotonic() < deadline, "the dead replica's settlement was never written"
        time.sleep(0.2)
    (row,) = rows
    # Its own settlement, not a sweeper's guess from the last progress report.
    assert row["outcome"] == "ok"
    assert row["completion_tokens"] == r.json()["usage"]["completion_tokens"] == 9
    # A peer adopted them (it logs once it has drained the dead replica's subject).
    while not any(logs.events(path, "usage_events_adopted") for path in stack.home.glob("logs/gateway-replica-*.log")):
        assert time.monotonic() < deadline, "no peer adopted the dead replica's events"
        time.sleep(0.2)
    assert query(stack.database_url, "SELECT 1 FROM reservations WHERE request_id = $1", rid) == []
    (usage,) = query(stack.database_url, "SELECT tokens, inflight FROM quota_usage WHERE subject = $1", account.subject)
    assert usage["inflight"] == 0


async def test_usage_events_written_twice_count_once(stack: Stack) -> None:
    """A consumer that dies after writing a batch but before acknowledging it gets the batch again."""
    account = await make_account_async(stack.database_url)
    day = dt.datetime.now(dt.UTC).date()
    rid = f"twice{secrets.token_hex(8)}"
    events: list[UsageEvent] = [
        Opened(rid, account.subject, account.account_id, account.key_id, None, SYNTHETIC, day, 500),
        Closed(rid, Settlement("p", 10, 20, 0, 5.0, 50.0, "ok"), keep_slot=False),
    ]
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)

    async def written(request_id: str) -> tuple[list[int], tuple[int, int, int], bool]:
        """Its ledger rows' completion tokens, the subject's (requests, tokens, inflight), a reservation row."""
        rows = await db.fetch("SELECT completion_tokens FROM usage_ledger WHERE request_id = $1", request_id)
        (usage,) = await db.fetch(
            "SELECT requests, tokens, inflight FROM quota_usage WHERE subject = $1", account.subject
        )
        reserved = await db.fetch("SELECT 1 FROM reservations WHERE request_id = $1", request_id)
        return (
            [r["completion_tokens"] for r in rows],
            (usage["requests"], usage["tokens"], usage["inflight"]),
            bool(reserved),
        )

    try:
        await db.execute(
            "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT DO NOTHING", account.subject, day
        )
        for batch in (events, events, events[:1], events[1:]):
            await ledger.apply(db, "gw-twice", batch)
        assert await written(rid) == ([20], (1, 30, 0), False)
        # A reservation written by one batch, then delivered again with its settlement (a batch that pairs
        # them, migration 0018): its row is there, so the pair settles it as usage_apply would, once.
        again = f"again{secrets.token_hex(8)}"
        pair: list[UsageEvent] = [
            Opened(again, account.subject, account.account_id, account.key_id, None, SYNTHETIC, day, 300),
            Closed(again, Settlement("p", 1, 2, 0, None, None, "ok"), keep_slot=False),
        ]
        await ledger.apply(db, "gw-twice", pair[:1])
        assert (await written(again))[2], "the reservation row is there"
        for batch in (pair, pair, [*pair, pair[0]]):
            await ledger.apply(db, "gw-twice", batch)
        assert await written(again) == ([2], (2, 33, 0), False)
    finally:
        await db.close()


@pytest.mark.parametrize("case", ["leased", "no-lease", "yesterday"])
async def test_a_whole_answers_event_counts_as_its_reservation_and_settlement_would(stack: Stack, case: str) -> None:
    """A whole answer's usage event goes straight to the ledger (migration 0018), without the reservation row
    its reservation and settlement would write and delete: the subject's counters, the replica's lease row and
    the ledger end exactly as they do with the two events. Each case on two accounts, the two events on one and
    the `Whole` on the other, with a lease of this replica (or none: a peer gave it back), and with events of
    the day before the subject's (a batch across midnight); the `Whole`s delivered twice count once."""
    day = dt.datetime.now(dt.UTC).date()
    event_day = day - dt.timedelta(days=1) if case == "yesterday" else day
    settlements = [
        (Settlement("p", 11, 21, 0, 5.0, 50.0, "ok"), True, 200),
        (Settlement("p", 3, 400, 2, 5.0, 50.0, "ok"), False, 100),  # more used than reserved
        (Settlement(None, 0, 0, 0, None, None, "unavailable", refund=True), False, 300),
        (Settlement("q", 7, 1, 0, 0.5, 9.0, "client_disconnected"), True, 50),
    ]
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    gw = f"gw-eq-{secrets.token_hex(3)}"
    Rows = list[tuple[object, ...]]
    state: dict[str, tuple[tuple[object, ...], Rows, Rows]] = {}
    try:
        for how in ("two", "whole"):
            account = await make_account_async(stack.database_url)
            holder = Holder(account.subject, account.account_id, account.key_id, None)
            limits = Limits(1000, 100_000, 50)
            await db.execute(
                "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                account.subject,
                day,
            )
            if case != "no-lease":
                lease = leases.Lease(account.subject, day, limits)
                want = (20, 5_000, 10)
                granted = await leases.grant(db, lease, holder, limits, need_t=1, want=want, gw=gw, stale_after_s=30)
                assert granted is None
            rids = [f"{how}-{i}-{secrets.token_hex(6)}" for i in range(len(settlements))]
            opens = [
                Opened(rid, account.subject, account.account_id, account.key_id, None, SYNTHETIC, event_day, tokens)
                for rid, (_, _, tokens) in zip(rids, settlements, strict=True)
            ]
            closes = [Closed(rid, s, keep_slot=keep) for rid, (s, keep, _) in zip(rids, settlements, strict=True)]
            if how == "two":
                await ledger.apply(db, gw, [*opens, *closes])
            else:
                wholes: list[UsageEvent] = [Whole(o, c) for o, c in zip(opens, closes, strict=True)]
                await ledger.apply(db, gw, wholes)
                await ledger.apply(db, gw, wholes[1:3])  # delivered again
            (usage,) = await db.fetch(
                "SELECT requests, tokens, inflight, leased_requests, leased_tokens, leased_slots "
                "FROM quota_usage WHERE subject = $1",
                account.subject,
            )
            lease_rows = await db.fetch(
                "SELECT requests, tokens, slots, window_day FROM quota_leases WHERE subject = $1", account.subject
            )
            rows = await db.fetch(
                "SELECT request_id, model, provider_id, prompt_tokens, completion_tokens, cached_tokens, ttft_ms, "
                "duration_ms, outcome, billed FROM usage_ledger WHERE subject = $1",
                account.subject,
            )
            # Keyed by the request's place in `settlements`.
            ledger_rows = sorted((r["request_id"].split("-")[1], *tuple(r)[1:]) for r in rows)
            state[how] = (tuple(usage), [tuple(r) for r in lease_rows], ledger_rows)
            assert await db.fetch("SELECT 1 FROM reservations WHERE subject = $1", account.subject) == []
        assert state["whole"] == state["two"]
        usage_two = state["two"][0]
        if case != "yesterday":
            # Not vacuous: 3 billed requests, their tokens, nothing in flight.
            assert usage_two[:3] == (3, 32 + 403 + 8, 0)
        assert len(state["two"][2]) == len(settlements)
    finally:
        await db.close()


async def test_a_batch_of_usage_events_writes_each_request_its_own_values(stack: Stack) -> None:
    """The consumer passes a batch to Postgres as JSON (migration 0017): every ledger row holds its own
    request's values, nulls, fractions and refunds included, whatever else the batch holds."""
    account = await make_account_async(stack.database_url)
    day = dt.datetime.now(dt.UTC).date()
    tag = secrets.token_hex(6)
    settlements = {
        f"a{tag}": Settlement("prov-a", 11, 21, 3, 12.5, 250.25, "ok"),
        f"b{tag}": Settlement(None, 0, 0, 0, None, None, "unavailable", refund=True),
        f"c{tag}": Settlement("prov-c\u00e9", 7, 1, 0, 0.75, 9.0, "client_disconnected"),
    }
    opens: list[UsageEvent] = [
        Opened(rid, account.subject, account.account_id, account.key_id, None, f"model-{rid}", day, 100 + i)
        for i, rid in enumerate(settlements)
    ]
    closes: list[UsageEvent] = [Closed(rid, s, keep_slot=False) for rid, s in settlements.items()]
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    try:
        await db.execute(
            "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT DO NOTHING", account.subject, day
        )
        await ledger.apply(db, "gw-batch", [*opens, *closes])
        rows = await db.fetch("SELECT * FROM usage_ledger WHERE request_id = ANY($1::text[])", list(settlements))
        written = {r["request_id"]: r for r in rows}
        assert set(written) == set(settlements)
        for rid, s in settlements.items():
            row = written[rid]
            assert (row["account_id"], row["key_id"], row["demo_token_id"]) == (
                account.account_id,
                account.key_id,
                None,
            )
            assert row["model"] == f"model-{rid}"
            assert (row["provider_id"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
                s.provider_id,
                s.prompt_tokens,
                s.completion_tokens,
                s.cached_tokens,
            )
            assert (row["ttft_ms"], row["duration_ms"]) == (s.ttft_ms, s.duration_ms)
            assert (row["outcome"], row["billed"]) == (s.outcome, not s.refund)
        (usage,) = await db.fetch(
            "SELECT requests, tokens, inflight FROM quota_usage WHERE subject = $1", account.subject
        )
        # The refunded request counts neither as a request nor its tokens; the others their real tokens.
        assert (usage["requests"], usage["tokens"], usage["inflight"]) == (2, 11 + 21 + 7 + 1, 0)
    finally:
        await db.close()


async def test_an_event_postgres_refuses_is_parked_and_the_events_after_it_are_written(
    stack: Stack, tmp_path: Path
) -> None:
    """A usage event that can never be written (Postgres refuses what it holds, or it does not decode) once
    held up every later settlement of its replica: its batch was tried again forever. It is kept in
    usage_dead_letters, byte for byte, once, and the events around it reach the ledger."""
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    nc = await nats.connect(server.url)
    gw = f"gw-poison-{secrets.token_hex(3)}"
    stream = UsageStream(nc, db, gw)
    account = await make_account_async(stack.database_url)
    day = dt.datetime.now(dt.UTC).date()
    good = [f"good{i}{secrets.token_hex(6)}" for i in range(2)]
    poison = f"poison{secrets.token_hex(6)}"

    async def request(rid: str) -> None:
        await stream.publish(Opened(rid, account.subject, account.account_id, account.key_id, None, SYNTHETIC, day, 9))
        await stream.publish(Closed(rid, Settlement("p", 3, 4, 0, 5.0, 50.0, "ok"), keep_slot=False))

    try:
        await db.execute(
            "INSERT INTO quota_usage (subject, window_day) VALUES ($1, $2) ON CONFLICT DO NOTHING", account.subject, day
        )
        await stream.start()
        await request(good[0])
        # 2^40 prompt tokens: beyond the ledger's integer columns, refused however often it is tried.
        await stream.publish(Closed(poison, Settlement("p", 1 << 40, 1, 0, None, None, "ok"), keep_slot=False))
        await nc.publish(subjects.usage_events(gw), b'{"type":"open","request_id":')  # cut short
        await request(good[1])
        await written_async(server.url, timeout_s=20)
        rows = await db.fetch(
            "SELECT request_id, completion_tokens FROM usage_ledger WHERE request_id = ANY($1::text[])", good
        )
        assert sorted((r["request_id"], r["completion_tokens"]) for r in rows) == sorted((rid, 4) for rid in good)
        parked = await db.fetch(
            "SELECT event, error FROM usage_dead_letters WHERE gateway_id = $1 ORDER BY stream_seq", gw
        )
        assert len(parked) == 2, parked
        assert poison.encode() in parked[0]["event"]
        assert str(1 << 40).encode() in parked[0]["event"]
        assert "out of int32 range" in parked[0]["error"] or "out of range" in parked[0]["error"], parked[0]["error"]
        assert parked[1]["event"] == b'{"type":"open","request_id":'
        assert parked[1]["error"].startswith("undecodable")
    finally:
        await stream.stop()
        await nc.close()
        await db.close()
        server.stop()


async def test_a_usage_event_waits_for_the_stream_instead_of_failing(stack: Stack, tmp_path: Path) -> None:
    """While the usage stream has no leader (its NATS node died; the others elect one in seconds) a publish
    gets no answer: the request waits and publishes again, rather than failing the buyer."""
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    nc = await nats.connect(server.url)
    try:
        stream = UsageStream(nc, db, "gw-retry", max_bytes=32 << 20)
        event = Closed("r-retry", Settlement(None, 1, 2, 0, None, None, "ok"), keep_slot=False)
        publishing = asyncio.ensure_future(stream.publish(event))
        await asyncio.sleep(0.5)
        assert not publishing.done(), "no stream yet: still trying"
        # The stream comes (back): the publish lands, once.
        await stream._ensure_stream()
        seq = await asyncio.wait_for(publishing, 5)
        info = await nc.jetstream().stream_info(subjects.USAGE_STREAM)
        assert (seq, info.state.messages) == (1, 1)
        assert info.config.max_bytes == 32 << 20, "MP_USAGE_STREAM_MAX_MB bounds what it may hold"
    finally:
        await nc.close()
        await db.close()
        server.stop()


async def test_a_reservation_whose_first_publish_fails_is_published_again(stack: Stack, tmp_path: Path) -> None:
    """A request's reservation event is sent without a task of its own (`UsageStream.send`, told to an
    `Opening`); a first
    try that finds no stream is tried again, as `publish` does, and the request's wait ends when it lands."""
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    nc = await nats_direct.connect(server.url)
    try:
        stream = UsageStream(nc, db, "gw-retry-open", max_bytes=32 << 20)
        await stream.publisher.start()
        day = dt.datetime.now(dt.UTC).date()
        event = Opened("r-retry-open", "a1", 1, 1, None, "m", day, 10)
        opened = Opening()
        stream.send(event, opened)
        await asyncio.sleep(0.5)
        assert opened.outcome is None, "no stream yet: still trying"
        await stream._ensure_stream()
        assert await asyncio.wait_for(opened.wait(), 5) is True
        info = await nc.jetstream().stream_info(subjects.USAGE_STREAM)
        assert info.state.messages == 1, "stored once: the tries before the stream existed stored nothing"
        # With the stream there, the next one lands on its first try.
        first_try = Opening()
        stream.send(Opened("r-first-try", "a1", 1, 1, None, "m", day, 10), first_try)
        assert await asyncio.wait_for(first_try.wait(), 5)
        assert (await nc.jetstream().stream_info(subjects.USAGE_STREAM)).state.messages == 2
    finally:
        await stream.publisher.stop()
        await nc.close()
        await db.close()
        server.stop()


async def test_a_whole_answer_whose_settlement_cannot_be_stored_keeps_its_share_and_stops_the_next(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole answer's reservation goes with its settlement (usage_events.Whole). While that cannot be stored
    (no usage stream), it is kept for another try with its reservation, its lease keeps its share in use, and
    the next whole answer is refused before generation (nothing unrecorded starts). Stored at the next try, it
    is written once, whole; given up on at last, its share goes back to the lease it came from."""
    monkeypatch.setattr(ledger, "PUBLISH_RETRY_S", 0.3)
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    nc = await nats_direct.connect(server.url)
    gw = f"gw-whole-{secrets.token_hex(3)}"
    # No touch loop during the test (it would try again on its own): the tries are the test's.
    metering = Metering(db, gw, touch_interval_s=3600, stale_after_s=7200, stream=UsageStream(nc, db, gw))
    account = await make_account_async(stack.database_url)
    holder = Holder(account.subject, account.account_id, account.key_id, None)
    limits = Limits(1000, 10**6, 10)
    js = nc.jetstream()
    try:
        await metering.start()
        first = await metering.reserve(holder, limits, f"w1{secrets.token_hex(6)}", SYNTHETIC, 100, stream=False)
        await metering.confirm(first)  # nothing to wait for: no reservation event was sent
        assert first.deferred is not None
        assert first.opening is None
        lease = first.lease
        assert lease is not None
        assert await db.fetch("SELECT 1 FROM reservations WHERE request_id = $1", first.request_id) == []
        await js.delete_stream(subjects.USAGE_STREAM)
        first.prompt_tokens, first.completion_tokens = 5, 6
        await asyncio.wait_for(metering.settle(first, outcome="ok"), 10)
        assert lease.in_use == 1, "its share stays in use until its settlement is stored"
        with pytest.raises(CoordinatorUnavailable):
            await metering.reserve(holder, limits, f"w2{secrets.token_hex(6)}", SYNTHETIC, 100, stream=False)
        # The stream is back: the next try stores the reservation and the settlement together, once.
        await metering._stream._ensure_stream()  # type: ignore[union-attr]
        await metering._retry_unsettled()
        assert lease.in_use == 0
        deadline = time.monotonic() + 20
        ledger_row = "SELECT prompt_tokens, completion_tokens, billed FROM usage_ledger WHERE request_id = $1"
        while not (rows := await db.fetch(ledger_row, first.request_id)):
            assert time.monotonic() < deadline, "the whole answer never reached the ledger"
            await asyncio.sleep(0.1)
        assert [tuple(r) for r in rows] == [(5, 6, True)]
        (usage,) = await db.fetch("SELECT requests, tokens FROM quota_usage WHERE subject = $1", account.subject)
        assert (usage["requests"], usage["tokens"]) == (1, 11)
        # The way is open again; one that is given up on at last gives its share back to its lease.
        second = await metering.reserve(holder, limits, f"w3{secrets.token_hex(6)}", SYNTHETIC, 100, stream=False)
        held = (lease.requests, lease.tokens, lease.slots, lease.in_use)
        monkeypatch.setattr(metering_module, "_SETTLE_TRIES", 1)
        await js.delete_stream(subjects.USAGE_STREAM)
        await asyncio.wait_for(metering.settle(second, outcome="ok"), 10)
        assert (lease.requests, lease.tokens, lease.slots, lease.in_use) == held
        await metering._retry_unsettled()
        assert (lease.requests, lease.tokens, lease.slots, lease.in_use) == (
            held[0] + 1,
            held[1] + 100,
            held[2] + 1,
            held[3] - 1,
        )
        assert await metering.reserve(holder, limits, f"w4{secrets.token_hex(6)}", SYNTHETIC, 100, stream=False)
    finally:
        await metering.stop()
        await nc.close()
        await db.close()
        server.stop()


@dataclass
class _Metered:
    """A metered replica in this process (its own nats-server for the usage stream, the suite's PostgreSQL)
    and one fresh account with room: its lease grants are read from the replica's metrics."""

    metering: Metering
    metrics: Metrics
    db: asyncpg.Pool
    nats_url: str
    account: TestAccount
    holder: Holder
    limits: Limits

    def grants(self, short: str) -> float:
        return self.metrics.registry.get_sample_value("mp_quota_lease_grants_total", {"short": short}) or 0.0

    async def answer(self, request_id: str) -> None:
        """One whole answer of 7 tokens: reserved, then settled."""
        ticket = await self.metering.reserve(self.holder, self.limits, request_id, SYNTHETIC, 100, stream=False)
        ticket.prompt_tokens, ticket.completion_tokens = 3, 4
        await asyncio.wait_for(self.metering.settle(ticket, outcome="ok"), 10)


@contextlib.asynccontextmanager
async def _metered(stack: Stack, tmp_path: Path) -> AsyncIterator[_Metered]:
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=4)
    nc = await nats_direct.connect(server.url)
    gw = f"gw-leases-{secrets.token_hex(3)}"
    metrics = Metrics()
    # No maintenance tick unless the test runs one: a tick starts a new peak and gives idle leases back.
    metering = Metering(
        db, gw, touch_interval_s=3600, stale_after_s=7200, stream=UsageStream(nc, db, gw), metrics=metrics
    )
    account = await make_account_async(stack.database_url)
    holder = Holder(account.subject, account.account_id, account.key_id, None)
    try:
        await metering.start()
        yield _Metered(metering, metrics, db, server.url, account, holder, Limits(10**6, 10**9, 1000))
    finally:
        await metering.stop()
        await nc.close()
        await db.close()
        server.stop()


async def test_a_load_that_rises_and_falls_on_one_key_leases_its_slots_once(stack: Stack, tmp_path: Path) -> None:
    """One key's requests on a replica rise to 12 at once and fall to none, again and again (a closed loop
    whose client is busy half the time). The lease keeps the slots its peak needed: the rises after the first
    take no grant for slots (each had taken a few statements, a dozen requests apart), the grants show in the
    replica's metrics by what ran short, and every request is stored once."""
    request_ids: list[str] = []
    slot_grants: list[float] = []
    async with _metered(stack, tmp_path) as m:
        for _ in range(6):
            before = m.grants("slots")
            tickets = []
            for _ in range(12):
                request_ids.append(f"wave-{secrets.token_hex(6)}")
                tickets.append(
                    await m.metering.reserve(m.holder, m.limits, request_ids[-1], SYNTHETIC, 100, stream=False)
                )
            for ticket in tickets:
                ticket.prompt_tokens, ticket.completion_tokens = 3, 4
                await asyncio.wait_for(m.metering.settle(ticket, outcome="ok"), 10)
            slot_grants.append(m.grants("slots") - before)
        assert slot_grants[0] > 0, "the first rise leases its slots"
        assert slot_grants[1:] == [0] * 5, slot_grants
        assert m.grants("requests") > 0, "the first grant of a new lease is for requests"
        deadline = time.monotonic() + 20
        stored = "SELECT count(*) FROM usage_ledger WHERE request_id = ANY($1::text[]) AND completion_tokens = 4"
        while await m.db.fetchval(stored, request_ids) < len(request_ids):
            assert time.monotonic() < deadline, "not every request reached the ledger"
            await asyncio.sleep(0.1)
        (usage,) = await m.db.fetch("SELECT requests, tokens FROM quota_usage WHERE subject = $1", m.account.subject)
        assert (usage["requests"], usage["tokens"]) == (72, 72 * 7)


async def test_a_subject_working_in_bursts_leases_each_burst_at_once(stack: Stack, tmp_path: Path) -> None:
    """A key that sends a burst of 8 requests, pauses for longer than a lease stands by (its idle lease goes
    back to the account), then sends 8 more: the second burst's lease asks at once for what the first one used,
    one statement instead of one per doubling (1, 2, 4, 8); nothing of the first lease stays held meanwhile.
    After a shorter pause the lease stands by, refilled at the tick for a burst like the last: the third burst
    waits for no statement."""
    leased = "SELECT leased_requests FROM quota_usage WHERE subject = $1"
    async with _metered(stack, tmp_path) as m:

        def waited_for() -> float:
            return sum(m.grants(short) for short in ("requests", "tokens", "slots", "none"))

        async def burst() -> float:
            before = waited_for()
            for _ in range(8):
                await m.answer(f"b-{secrets.token_hex(6)}")
            return waited_for() - before

        assert await burst() == 4, "a new subject's lease doubles: 1, 2, 4, 8"
        m.metering._leases[m.account.subject].used_at -= 10_000  # idle for longer than a lease stands by
        await m.metering._maintain()
        assert m.account.subject not in m.metering._leases
        await written_async(m.nats_url)  # the burst's own events take their share from the lease row
        assert await m.db.fetchval(leased, m.account.subject) == 0, "the idle lease went back whole"
        assert await burst() == 1, "the next burst's lease covers it at once"
        # A pause within the hold: the lease stands by, refilled at the tick for a burst like the last one.
        m.metering._leases[m.account.subject].used_at -= 2000
        await m.metering._maintain()
        assert m.grants("ahead") == 1
        assert await burst() == 0, "the burst after a short pause waits for no grant at all"


@pytest.mark.parametrize("concurrent", [1000, 4], ids=["room-to-spare", "near-the-limit"])
async def test_a_key_asking_every_few_seconds_is_served_from_a_lease_standing_by(
    stack: Stack, tmp_path: Path, concurrent: int
) -> None:
    """A buyer's next message comes a while after the last (a chat). With room to spare its idle lease stands by
    through the maintenance ticks in between, refilled at a tick when it is short of one more request like the
    last: no request after the first waits for a lease statement. Idle for longer than a dead replica's lease
    would stay held (MP_RESERVATION_STALE_S), it goes back whole. Near the concurrency limit the lease goes back
    after one idle tick, as before."""
    leased = "SELECT leased_requests, leased_tokens, leased_slots FROM quota_usage WHERE subject = $1"
    waited_for = ("requests", "tokens", "slots", "none")
    async with _metered(stack, tmp_path) as m:
        m.limits = Limits(10**6, 10**9, concurrent)
        await m.answer(f"c-{secrets.token_hex(6)}")
        assert sum(m.grants(short) for short in waited_for) == 1, "the first request waits for its lease"
        for _ in range(3):
            # A tick's worth later (this replica's ticks are 30 minutes apart), within the hold (2 hours).
            m.metering._leases[m.account.subject].used_at -= 2000
            await m.metering._maintain()
            if concurrent == 4:
                assert m.account.subject not in m.metering._leases, "near the limit: given back"
                break
            await m.answer(f"c-{secrets.token_hex(6)}")
        else:
            assert sum(m.grants(short) for short in waited_for) == 1, "the later ones waited for none"
            assert m.grants("ahead") == 3, "the lease standing by was refilled at each tick instead"
            m.metering._leases[m.account.subject].used_at -= 10_000  # idle longer than a lease stands by
            await m.metering._maintain()
            assert m.account.subject not in m.metering._leases
        await written_async(m.nats_url)
        row = await m.db.fetchrow(leased, m.account.subject)
        assert row is not None
        assert tuple(row) == (0, 0, 0), "the lease went back whole"


async def test_reading_your_writes_waits_for_busy_replicas(stack: Stack, tmp_path: Path) -> None:
    """Between two batches a busy replica has no pull waiting at the server: its progress shows it is alive,
    so a reader waits for its events (it once took such a replica for dead and read too early; the same
    signal keeps peers from adopting a busy replica's events)."""
    server = NatsServer.start(tmp_path / "nats")
    db = await asyncpg.create_pool(stack.database_url, min_size=2, max_size=8)
    connections = [await nats.connect(server.url) for _ in range(3)]
    meterings = [
        Metering(db, f"gw-busy-{i}", stale_after_s=2, stream=UsageStream(nc, db, f"gw-busy-{i}", idle_s=2))
        for i, nc in enumerate(connections)
    ]
    account = await make_account_async(stack.database_url)
    holder = Holder(account.subject, account.account_id, account.key_id, None)
    limits = Limits(10**9, 10**12, 1000)
    done: list[str] = []
    try:
        for m in meterings:
            await m.start()
        stop = time.monotonic() + 3

        async def worker(w: int) -> None:
            while time.monotonic() < stop:
                rid = f"busy{w}x{len(done)}x{secrets.token_hex(4)}"
                metering = meterings[w % len(meterings)]
                ticket = await metering.reserve(holder, limits, rid, SYNTHETIC, 100)
                await metering.confirm(ticket)
                ticket.prompt_tokens, ticket.completion_tokens = 10, 20
                await metering.settle(ticket, outcome="ok")
                done.append(rid)

        await asyncio.gather(*(worker(w) for w in range(24)))
        assert await meterings[0].caught_up(10)
        n = await db.fetchval("SELECT count(*) FROM usage_ledger WHERE subject = $1", account.subject)
        assert n == len(done) > 100
    finally:
        for m in meterings:
            await m.stop()
        for nc in connections:
            await nc.close()
        await db.close()
        server.stop()


async def test_a_control_plane_without_jetstream_says_what_to_do(stack: Stack, tmp_path: Path) -> None:
    # An account without JetStream (an operator's own NATS): the gateway refuses to start, naming the fix.
    server = NatsServer.start(tmp_path / "nats", config_extra="accounts { A { users: [{user: a, password: a}] } }")
    db = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
    nc = await nats.connect(server.url.replace("nats://", "nats://a:a@"), max_reconnect_attempts=0)
    try:
        with pytest.raises(UsageStreamUnavailable, match=r"jetstream: enabled.*MP_SETTLEMENT=postgres"):
            await UsageStream(nc, db, "gw-nojs").start()
    finally:
        await nc.close()
        await db.close()
        server.stop()


def test_usage_report(stack: Stack) -> None:
    account = make_account(stack.database_url, requests_per_day=50, tokens_per_day=100_000, concurrent=3)
    ids = []
    for n in (3, 5):
        r = httpx.post(f"{stack.v1}/chat/completions", json=_body(TINY_MODEL, max_tokens=n), headers=account.auth())
        ids.append(r.headers["x-request-id"])
    r = httpx.get(f"{stack.v1}/usage", headers=account.auth())
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["object"] == "usage"
    assert report["account_id"] == account.account_id
    assert report["key"]["id"] == account.key_id
    assert report["key"]["prefix"] == account.key[:9]
    assert account.key not in r.text
    assert report["key"]["requests_today"] == 2
    quotas = report["quotas"]
    assert quotas["requests_per_day"] == {"limit": 50, "used": 2, "remaining": 48}
    assert quotas["concurrent_requests"] == {"limit": 3, "in_flight": 0}
    (model_day,) = report["by_model"]
    assert model_day["model"] == TINY_MODEL
    assert model_day["requests"] == 2
    assert model_day["completion_tokens"] == 8
    assert quotas["tokens_per_day"]["used"] == model_day["total_tokens"]
    assert report["window"]["resets_in_s"] > 0
    assert report["days"] == 7
    assert r.headers["x-ratelimit-remaining-requests"] == "48"
    assert httpx.get(f"{stack.v1}/usage?days=30", headers=account.auth()).json()["days"] == 30
    models = httpx.get(f"{stack.v1}/models", headers=account.auth())
    assert models.headers["x-ratelimit-remaining-requests"] == "48"
    assert models.headers["x-ratelimit-limit-tokens"] == "100000"
    for bad in ("0", "91", "abc", "-1"):
        err = httpx.get(f"{stack.v1}/usage?days={bad}", headers=account.auth())
        assert err.status_code == 400
        assert err.json()["error"]["param"] == "days"
    assert httpx.get(f"{stack.v1}/usage").json()["error"]["code"] == "missing_bearer_token"


def test_feedback(stack: Stack) -> None:
    mine = make_account(stack.database_url)
    other = make_account(stack.database_url)
    r = httpx.post(f"{stack.v1}/chat/completions", json=_body(TINY_MODEL), headers=mine.auth())
    request_id = r.headers["x-request-id"]

    def rate(who: dict[str, str], **body: object) -> httpx.Response:
        return httpx.post(f"{stack.v1}/feedback", json=body, headers=who)

    first = rate(mine.auth(), request_id=request_id, rating=2, comment="meh")
    assert first.status_code == 200, first.text
    assert first.json()["replaced"] is False
    again = rate(mine.auth(), request_id=r.json()["id"], rating=5, comment="great, actually")
    assert again.json()["replaced"] is True
    # Someone else's request and an unknown id look the same.
    for who, rid in ((other.auth(), request_id), (mine.auth(), "0" * 24)):
        err = rate(who, request_id=rid, rating=1)
        assert err.status_code == 404
        assert err.json()["error"]["code"] == "not_found"
    for bad, param in (({"rating": 6}, "rating"), ({"rating": 0}, "rating"), ({"comment": "x" * 2001}, "comment")):
        err = rate(mine.auth(), **{"request_id": request_id, "rating": 3, **bad})
        assert err.status_code == 400
        assert err.json()["error"]["param"] == param
    report = httpx.get(f"{stack.v1}/usage", headers=mine.auth()).json()
    assert report["ratings"]["count"] == 1
    assert report["ratings"]["average"] == 5.0
    assert report["ratings"]["distribution"]["5"] == 1
    # Operators see it.
    out = subprocess.run(
        [sys.executable, "-m", "services", "admin", "feedback", "--model", TINY_MODEL, "--rating", "5"],
        env={"DATABASE_URL": stack.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "great, actually" in out
    assert TINY_MODEL in out
    out = subprocess.run(
        [sys.executable, "-m", "services", "admin", "feedback", "--rating", "1"],
        env={"DATABASE_URL": stack.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "great, actually" not in out


def test_demo_tokens_have_their_own_quota_and_feedback(stack: Stack, synthetic_daemon: Child) -> None:
    issued = httpx.post(f"{stack.base_url}/auth/demo")
    assert issued.status_code == 201, issued.text
    demo = {"Authorization": f"Bearer {issued.json()['token']}"}
    account = make_account(stack.database_url)
    theirs = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=account.auth())

    first = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=demo)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "20"  # the demo default, not an account's
    mine = first.headers["x-request-id"]
    assert httpx.post(f"{stack.v1}/feedback", json={"request_id": mine, "rating": 4}, headers=demo).status_code == 200
    # A demo token cannot rate an account's request, nor an account the demo's.
    other = theirs.headers["x-request-id"]
    assert httpx.post(f"{stack.v1}/feedback", json={"request_id": other, "rating": 1}, headers=demo).status_code == 404
    assert (
        httpx.post(f"{stack.v1}/feedback", json={"request_id": mine, "rating": 1}, headers=account.auth()).status_code
        == 404
    )
    # The demo token's /v1/usage is its own: its one request, its rating, its quota; no account, no key.
    report = httpx.get(f"{stack.v1}/usage", headers=demo)
    assert report.status_code == 200, report.text
    body = report.json()
    assert (body["account_id"], body["key"]) == (None, None)
    assert body["demo_token"]["expires_at"] == issued.json()["expires_at"]
    assert [(m["model"], m["requests"]) for m in body["by_model"]] == [(SYNTHETIC, 1)]
    assert body["ratings"]["count"] == 1
    assert body["ratings"]["distribution"]["4"] == 1
    assert body["quotas"]["requests_per_day"] == {"limit": 20, "used": 1, "remaining": 19}
    assert report.headers["x-ratelimit-remaining-requests"] == "19"
    statuses = Counter(
        httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC), headers=demo).status_code for _ in range(20)
    )
    assert statuses == {200: 19, 429: 1}


def test_a_settlement_that_fails_is_retried_and_bills_what_was_delivered(stack: Stack, synthetic_daemon: Child) -> None:
    """Postgres refuses the settlement when the answer ends (as while it restarts): the usage stream keeps it
    and its consumer tries again, so the ledger bills the tokens the buyer got, not the progress last
    reported before the end."""
    account = make_account(stack.database_url)
    # A real failure of the settling statement, for this account only: its ledger insert raises.
    fn, trigger = f"refuse_{account.key_id}", f"refuse_ledger_{account.key_id}"
    query(
        stack.database_url,
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'down'; END $$",
    )
    query(
        stack.database_url,
        f"CREATE TRIGGER {trigger} BEFORE INSERT ON usage_ledger FOR EACH ROW "
        f"WHEN (NEW.key_id = {account.key_id}) EXECUTE FUNCTION {fn}()",
    )
    try:
        r = httpx.post(f"{stack.v1}/chat/completions", json=_body(SYNTHETIC, max_tokens=7), headers=account.auth())
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        logs.wait_event(stack.gateway.log_path, "usage_apply_failed", error="RaiseError")
        assert query(stack.database_url, "SELECT 1 FROM usage_ledger WHERE request_id = $1", rid) == []
    finally:
        query(stack.database_url, f"DROP TRIGGER {trigger} ON usage_ledger")
        query(stack.database_url, f"DROP FUNCTION {fn}()")
    deadline = time.monotonic() + 10
    while not (rows := query(stack.database_url, "SELECT * FROM usage_ledger WHERE request_id = $1", rid)):
        assert time.monotonic() < deadline, "the failed settlement was never written"
        time.sleep(0.1)
    assert rows[0]["completion_tokens"] == r.json()["usage"]["completion_tokens"] == 7
    assert rows[0]["outcome"] == "ok"
    assert rows[0]["billed"]
    assert query(stack.database_url, "SELECT 1 FROM reservations WHERE request_id = $1", rid) == []
