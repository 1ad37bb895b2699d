"""The scale benchmark's faults: each injected into the running cluster under steady load, then audited.

A fault runs against its own account (a fresh key), so its ledger rows are its own. Load (streamed
and non-streamed requests, closed loop) runs before, during and after it; the fault's actions are
blocking process work (kill, restart, wait for ready), done in a thread while the load goes on.

Afterwards every reservation of the account must settle (a dead replica's are settled by another
after MP_RESERVATION_STALE_S), and the ledger is compared, by request id, with what the clients saw:
- lost: a request the client got an answer for (HTTP 200) with no ledger row, or a reservation
  never settled;
- billed more than delivered: a row billing more completion tokens than its client received, or a
  billed row (tokens > 0) whose request id no client ever saw;
- billed less than delivered: fewer (a killed replica's requests are settled from the progress it
  last reported, up to 2 s old): said, not hidden, but the buyer is not harmed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from infra.cluster.launch import Cluster
from services.providers.store import set_status
from tests.bench.load import HttpClients, Sample, ViaGateway, drive_while
from tests.bench.progress import say
from tests.support.accounts import TestAccount, make_account_async

# Client-side: a read silent this long is a hung request (a stream here lasts about a second).
CLIENT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Fault:
    label: str
    inject: Callable[[Cluster], None]
    # Undo it (restart, SIGCONT); None: the fault is its own repair (a restart).
    repair: Callable[[Cluster], None] | None = None
    # How long the fault lasts under load before the repair.
    hold_s: float = 4.0


def _rolling_restart(cluster: Cluster) -> None:
    for i in range(len(cluster.gateways)):
        code = cluster.drain_gateway(i)
        if code != 0:
            say(f"  gateway-{i} exited with status {code} after SIGTERM")
        cluster.start_gateway_again(i)


# Which replica, node, daemon: index 0 is the first of each (nats-0 also carries a natsauth replica).
FAULTS: dict[str, Fault] = {
    "gateway": Fault("gateway kill -9", lambda c: c.kill_gateway(0), lambda c: c.start_gateway_again(0)),
    "nats": Fault("NATS node kill -9", lambda c: c.kill_nats(0), lambda c: c.start_nats_again(0)),
    "daemon-kill": Fault("daemon kill -9", lambda c: c.kill_daemon(0), lambda c: c.start_daemon_again(0)),
    "daemon-stop": Fault("daemon SIGSTOP", lambda c: c.freeze_daemon(1), lambda c: c.thaw_daemon(1), hold_s=6.0),
    "postgres": Fault("PostgreSQL restart", lambda c: c.restart_postgres(down_s=1.0), hold_s=0.0),
    "rolling": Fault("rolling restart", _rolling_restart, hold_s=0.0),
}


@dataclass
class Audit:
    """The ledger against the clients, for one account."""

    rows: int = 0
    lost: int = 0
    unsettled: int = 0
    over_billed: int = 0
    unseen_billed: int = 0
    under_billed: int = 0
    under_billed_tokens: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class FaultResult:
    label: str
    samples: list[Sample]
    fault_at: float
    repaired_at: float
    audit: Audit
    # Providers the pool suspended or banned during the fault (honest daemons: must be none).
    shut_out: list[str] = field(default_factory=list)
    # Protocol violations the gateways recorded against the (honest) daemons during the fault, by kind.
    violations: Counter[str] = field(default_factory=Counter)

    def _failed(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    @property
    def failed(self) -> int:
        return len(self._failed())

    @property
    def hung(self) -> int:
        return sum(1 for s in self.samples if _hung(s))

    @property
    def cut_silently(self) -> int:
        return sum(1 for s in self.samples if s.error in SILENT)

    @property
    def cut_in_band(self) -> int:
        return sum(1 for s in self.samples if s.error and s.error.startswith("in_band:") and s.tokens > 0)

    @property
    def cut_transport(self) -> int:
        return sum(
            1 for s in self.samples if s.error and s.error.startswith("client:") and s.tokens > 0 and not _hung(s)
        )

    @property
    def recovered_s(self) -> float:
        """From the fault to the end of the last failed request (0: none failed)."""
        ends = [s.end for s in self._failed()]
        return max(0.0, max(ends) - self.fault_at) if ends else 0.0

    @property
    def repair_s(self) -> float:
        return self.repaired_at - self.fault_at

    @property
    def slowest_s(self) -> float:
        return max((s.latency_s for s in self.samples), default=0.0)

    @property
    def errors(self) -> Counter[str]:
        return Counter(s.error for s in self.samples if s.error is not None)


# Endings a client could mistake for an answer: the stream stopped without an error (or lied about its length).
SILENT = frozenset({"no_done_marker", "short_stream", "no_finish", "usage_mismatch", "client:bad_sse_chunk"})


def _hung(s: Sample) -> bool:
    return bool(s.error and s.error.startswith("client:") and s.error.endswith("Timeout")) or (
        s.latency_s >= CLIENT_TIMEOUT_S
    )


async def audit(database_url: str, account: TestAccount, samples: list[Sample], *, settle_s: float) -> Audit:
    """Wait up to `settle_s` for the account's reservations to settle, then compare its ledger with `samples`."""
    deadline = time.monotonic() + settle_s
    while True:
        conn = await asyncpg.connect(database_url)
        try:
            open_ = await conn.fetchval("SELECT count(*) FROM reservations WHERE key_id = $1", account.key_id)
            if open_ == 0 or time.monotonic() > deadline:
                rows = await conn.fetch(
                    "SELECT request_id, completion_tokens, billed, outcome FROM usage_ledger WHERE key_id = $1",
                    account.key_id,
                )
                break
        finally:
            await conn.close()
        await asyncio.sleep(0.5)
    result = Audit(rows=len(rows), unsettled=int(open_))
    ledger = {r["request_id"]: r for r in rows}
    result.outcomes = Counter(r["outcome"] for r in rows)
    seen: set[str] = set()
    for s in samples:
        if s.request_id is None:
            continue
        seen.add(s.request_id)
        row = ledger.get(s.request_id)
        answered = s.ok or s.tokens > 0 or (s.error is not None and not s.error.startswith("http_"))
        if row is None:
            result.lost += answered
            continue
        billed = row["completion_tokens"] if row["billed"] else 0
        # Streamed: the content tokens that arrived; not streamed: the usage of a 200 answer, else none.
        delivered = s.tokens
        if billed > delivered:
            result.over_billed += 1
        elif billed < delivered:
            result.under_billed += 1
            result.under_billed_tokens += delivered - billed
    for rid, row in ledger.items():
        if rid not in seen and row["billed"] and row["completion_tokens"] > 0:
            result.unseen_billed += 1
    return result


async def run_fault(
    cluster: Cluster,
    fault: Fault,
    *,
    base_url: str,
    model: str,
    tokens: int,
    streams: int,
    whole: int,
    before_s: float,
    after_s: float,
    settle_s: float,
) -> FaultResult:
    account = await make_account_async(cluster.database_url)
    violations_before = await violations(cluster)
    load_on = True
    async with HttpClients(streams + whole, 8, timeout_s=CLIENT_TIMEOUT_S) as clients:
        stream = ViaGateway(clients, base_url, account.key, model, tokens)
        whole_req = ViaGateway(clients, base_url, account.key, model, tokens, stream=False)

        def going() -> bool:
            return load_on

        loads = [
            asyncio.create_task(drive_while(stream, concurrency=streams, going=going)),
            asyncio.create_task(drive_while(whole_req, concurrency=whole, going=going, workers_from=streams)),
        ]
        await asyncio.sleep(before_s)
        fault_at = time.perf_counter()
        say(f"  {fault.label}: injecting")
        await asyncio.to_thread(fault.inject, cluster)
        if fault.hold_s:
            await asyncio.sleep(fault.hold_s)
        if fault.repair is not None:
            await asyncio.to_thread(fault.repair, cluster)
        repaired_at = time.perf_counter()
        say(f"  {fault.label}: repaired after {repaired_at - fault_at:.1f}s")
        await asyncio.sleep(after_s)
        load_on = False
        levels = await asyncio.gather(*loads)
    samples = [s for level in levels for s in level.samples]
    result = await audit(cluster.database_url, account, samples, settle_s=settle_s)
    recorded = await violations(cluster)
    recorded.subtract(violations_before)
    return FaultResult(fault.label, samples, fault_at, repaired_at, result, await readmit(cluster), +recorded)


async def violations(cluster: Cluster) -> Counter[str]:
    """Violations recorded so far against the cluster's daemons, by kind (the gateways flush every 0.5 s)."""
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT kind, sum(occurrences)::int AS n FROM provider_violations"
            " WHERE provider_id = ANY($1) GROUP BY kind",
            [d.provider_id for d in cluster.daemons],
        )
    finally:
        await conn.close()
    return Counter({r["kind"]: r["n"] for r in rows})


async def readmit(cluster: Cluster) -> list[str]:
    """The cluster's daemons the pool suspended or banned (named, then pinned again so the next part runs)."""
    ids = [d.provider_id for d in cluster.daemons]
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT provider_id, status FROM providers"
            " WHERE provider_id = ANY($1) AND status IN ('suspended', 'banned')",
            ids,
        )
        for row in rows:
            await set_status(conn, row["provider_id"], "pinned", "the scale benchmark's own daemon")
    finally:
        await conn.close()
    return [f"{r['provider_id']} ({r['status']})" for r in rows]
