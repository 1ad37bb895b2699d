"""Canary checks: each admitted provider answers greedy prompts now and then, compared with a trusted answer.

Which providers: every admitted one serving a model whose weights identity is in the
catalog (`verified`; uncatalogued models have no trusted answer to compare with). When:
within `join_delay_s` of a provider joining or loading other weights (a random moment, so
the first request after a join is not always the canary), then every `interval_s` on
average, jittered uniformly from half to one and a half times it. The schedule and a lease
live in Postgres (services/canary/store.py), so exactly one replica checks a given provider
at a time, whichever replica that is.

What: per verified model, one prompt of services/canary/prompts.py, sent like a buyer's
request (services/canary/probe.py), its answer compared (services/canary/compare.py) with
the reference recorded for that weights identity. A pinned provider's answer becomes the
reference when there is none yet (the first one recorded stands; `mac-provider admin models
trust` records them at once). A provider whose answer fails the comparison is suspended with
the reason (every replica stops routing to it at once, its running requests fail over), and
told why in its pool notice. A canary that gets no answer changes nothing but is tried again
sooner. Every run is a row in `canary_runs`, never in the usage ledger; its time to first
token and decoding speed feed this replica's routing (services/gateway/pool.py: Observed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import structlog
from nats.aio.client import Client as Nats

from schemas import bus
from schemas.tasks import cancel_and_wait
from services.canary import prompts, store
from services.canary.compare import Answer, Comparison, compare
from services.canary.probe import Reply, ask
from services.catalog.catalog import Catalog
from services.catalog.verdicts import Verdicts
from services.gateway.membership import Membership
from services.gateway.pool import PoolView
from services.gateway.replies import ReplyRouter
from services.providers.violations import Violations

if TYPE_CHECKING:
    from services.metrics.registry import Metrics

log = structlog.get_logger("gateway.canary")

# Canaries one replica runs at once.
_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class CanarySettings:
    join_delay_s: float = 30.0
    interval_s: float = 1800.0
    tokens: int = 24
    accept_timeout_s: float = 2.0
    # How long a canary's answer is waited for, and the deadline it carries (a buyer's: MP_REQUEST_TIMEOUT_S).
    timeout_s: float = 60.0
    deadline_s: float = 600.0

    def next_in(self) -> float:
        return self.interval_s * random.uniform(0.5, 1.5)


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str
    detail: str = ""
    compared: int = 0


def seen_key(hb: bus.Heartbeat, verified: list[tuple[str, str]]) -> str:
    """What a canary schedule belongs to: one daemon run serving these weights."""
    models = ",".join(f"{m}={sha}" for m, sha in sorted(verified))
    return f"{hb.boot_id}:{hashlib.sha256(models.encode()).hexdigest()[:32]}"


class Canaries:
    def __init__(
        self,
        *,
        db: asyncpg.Pool,
        nc: Nats,
        router: ReplyRouter,
        pool: PoolView,
        membership: Membership,
        catalog: Catalog,
        verdicts: Verdicts | None,
        violations: Violations | None,
        gateway_id: str,
        settings: CanarySettings,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._nc = nc
        self._router = router
        self._pool = pool
        self._membership = membership
        self._catalog = catalog
        self._verdicts = verdicts
        self._violations = violations
        self._gateway_id = gateway_id
        self.settings = settings
        self._metrics = metrics
        # Providers with verified models, and the schedule key this replica last noted for each.
        self._targets: dict[str, str] = {}
        self._noted: dict[str, str] = {}
        self._to_note: dict[str, str] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        membership.add_observer(self._observed)
        catalog.on_change(self._wake.set)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="canaries")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()  # all at once; then each until it has ended
        for task in tasks:
            await cancel_and_wait(task)

    # ---- who is due: from heartbeats (no I/O) ---------------------------------------------------

    def _observed(self, hb: bus.Heartbeat, verdicts: list[bus.ModelVerdict]) -> None:
        pid = hb.provider_id
        verified = [(v.model, v.weights_sha256) for v in verdicts if v.status == "verified"]
        if not verified or hb.draining:
            self._targets.pop(pid, None)
            self._noted.pop(pid, None)
            return
        key = seen_key(hb, verified)
        self._targets[pid] = key
        if self._noted.get(pid) != key:
            self._noted[pid] = key
            self._to_note[pid] = key
            self._wake.set()

    # ---- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        tick = max(0.05, min(1.0, self.settings.join_delay_s / 4))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._note_joins()
                await self._claim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("canary_schedule_failed", error=type(exc).__name__, detail=str(exc)[:200])
                await asyncio.sleep(1.0)

    async def _note_joins(self) -> None:
        while self._to_note:
            pid, key = self._to_note.popitem()
            try:
                await store.note_seen(self._db, pid, key, due_in_s=random.uniform(0, self.settings.join_delay_s))
            except Exception:
                self._to_note.setdefault(pid, key)
                raise

    async def _claim(self) -> None:
        # Forget providers gone from this replica's view (their schedule stays in Postgres).
        for pid in [p for p in self._targets if self._membership.reported(p) is None]:
            del self._targets[pid]
            # Noted again if it comes back (a no-op in Postgres when its run did not change).
            self._noted.pop(pid, None)
        candidates = [p for p in self._targets if p not in self._running]
        free = _CONCURRENCY - len(self._running)
        claimed = await store.claim(
            self._db, self._gateway_id, candidates, lease_s=self.settings.timeout_s * 2 + 30, limit=free
        )
        for c in claimed:
            self._running[c.provider_id] = asyncio.create_task(self._check(c), name=f"canary-{c.provider_id}")

    # ---- one provider ---------------------------------------------------------------------------

    async def _check(self, claimed: store.Claimed) -> None:
        pid = claimed.provider_id
        result = "skipped"
        try:
            hb = self._membership.reported(pid)
            if hb is not None:
                for model in hb.models:
                    if not self._catalog.listed(model.id, model.weights_sha256):
                        continue
                    outcome = await self.check_model(pid, claimed.status, model)
                    result = outcome.result
                    if result == "failed":
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("canary_failed_to_run", provider=pid, error=type(exc).__name__, detail=str(exc)[:200])
            result = "error"
        finally:
            self._running.pop(pid, None)
            if self._metrics is not None:
                self._metrics.canary(result)
            # Tried again sooner when it could not be judged; suspended providers are not due again.
            soon = result in ("unanswered", "error", "skipped")
            next_in = random.uniform(0.5, 1.5) * self.settings.join_delay_s if soon else self.settings.next_in()
            with contextlib.suppress(Exception):
                await store.finish(self._db, pid, self._gateway_id, next_in_s=max(1.0, next_in), result=result)

    async def check_model(self, pid: str, status: str, model: bus.ModelInfo) -> Outcome:
        sha = model.weights_sha256
        references = await store.references(self._db, sha)
        keys = {prompts.prompt_key(p, self.settings.tokens): p for p in prompts.PROMPTS}
        # A provider that cannot record a reference is asked what can be compared, if anything can.
        choices = list(keys) if status == "pinned" else [k for k in keys if k in references] or list(keys)
        key = random.choice(choices)
        request = prompts.request(
            model.id,
            keys[key],
            self.settings.tokens,
            deadline_s=self.settings.deadline_s,
            # What a buyer's request carries: the same router tells the provider this gateway is there.
            keepalive_ms=self._router.keepalive_ms,
        )
        reply = await ask(
            self._nc,
            self._router,
            self._gateway_id,
            pid,
            request,
            vocab_size=model.vocab_size,
            accept_timeout_s=self.settings.accept_timeout_s,
            timeout_s=self.settings.timeout_s,
            pool=self._pool,
            violations=self._violations,
        )
        outcome = await self._judge(pid, status, sha, key, reply, references.get(key))
        await store.record_run(
            self._db,
            provider_id=pid,
            model_id=model.id,
            sha256=sha,
            prompt_key=key,
            request_id=request.request_id,
            result=outcome.result,
            detail=outcome.detail,
            tokens_compared=outcome.compared,
            ttft_ms=round(reply.ttft_s * 1000, 2) if reply.ttft_s is not None else None,
            decode_tps=_rate(reply),
            gateway_id=self._gateway_id,
        )
        log.info(
            "canary",
            provider=pid,
            model=model.id,
            result=outcome.result,
            compared=outcome.compared,
            detail=outcome.detail[:200],
            ttft_ms=round(reply.ttft_s * 1000, 1) if reply.ttft_s is not None else None,
        )
        if outcome.result == "failed":
            await self._fail(pid, model, outcome, request.request_id)
        return outcome

    async def _judge(
        self, pid: str, status: str, sha: str, key: str, reply: Reply, reference: Answer | None
    ) -> Outcome:
        answer = reply.answer
        if answer is None:
            return Outcome("unanswered", reply.error)
        if not answer.token_ids:
            return Outcome("unanswered", "no tokens")
        if reference is None:
            if status != "pinned":
                return Outcome("no_reference", "no reference answer recorded for these weights yet")
            reference = await store.record_reference(self._db, sha, key, answer, pid)
            if reference == answer:
                return Outcome("recorded", f"{len(answer.token_ids)} tokens recorded as the reference")
        comparison: Comparison = compare(answer, reference)
        return Outcome(comparison.result, comparison.detail, comparison.compared)

    async def _fail(self, pid: str, model: bus.ModelInfo, outcome: Outcome, request_id: str) -> None:
        detail = f"canary answer differs from the reference of these weights: {outcome.detail}"
        if self._verdicts is not None:
            # Told first: the suspension closes the provider's NATS connection (services/natsauth/),
            # after which no notice can reach it.
            self._verdicts.override(
                pid, bus.ModelVerdict(model.id, "canary_failed", False, model.weights_sha256, detail[:1000])
            )
            with contextlib.suppress(Exception):
                await self._verdicts.tell_now()
        newly = await store.suspend(self._db, pid, model.id, detail, request_id=request_id, gateway_id=self._gateway_id)
        log.warning("provider_suspended", provider=pid, reason="canary_failed", model=model.id, detail=detail[:300])
        if not newly:
            log.info("canary_failed_provider_already_out", provider=pid)


def _rate(reply: Reply) -> float | None:
    answer = reply.answer
    if answer is None or reply.decode_s is None or reply.decode_s <= 0 or len(answer.token_ids) < 2:
        return None
    return round((len(answer.token_ids) - 1) / reply.decode_s, 2)
