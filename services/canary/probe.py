"""Sending one canary to one provider and reading its answer, as the gateway reads a buyer's.

The request goes to the provider's work subject with this replica's reply subject, like
any other; its frames are checked by the same rules (services/gateway/vetting.py; a broken
rule is recorded as a violation) and it counts as this replica's load on the provider while
it runs. Nothing here touches quotas or the usage ledger: canary traffic is nobody's bill.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from nats.aio.client import Client as Nats

from schemas import bus, subjects
from services.canary.compare import Answer, margin
from services.gateway import vetting
from services.gateway.pool import PoolView
from services.gateway.replies import ReplyRouter, StreamBroken, lost_notifier
from services.providers.violations import Violations


@dataclass(frozen=True, slots=True)
class Reply:
    """What the provider did with a canary: an answer, or the reason there is none."""

    answer: Answer | None
    error: str = ""
    # Sent to first token, and first token to the end (None when there was no token).
    ttft_s: float | None = None
    decode_s: float | None = None


async def ask(
    nc: Nats,
    router: ReplyRouter,
    gateway_id: str,
    provider_id: str,
    request: bus.InferenceRequest,
    *,
    vocab_size: int = 0,
    accept_timeout_s: float = 2.0,
    timeout_s: float = 60.0,
    pool: PoolView | None = None,
    violations: Violations | None = None,
) -> Reply:
    max_frames, max_bytes = vetting.frame_budget(request)
    stream = router.open(request.request_id, provider_id, max_frames=max_frames, max_bytes=max_bytes)
    watch = pool.watch(provider_id, lost_notifier(stream)) if pool is not None else 0
    epoch = pool.note_sent(provider_id) if pool is not None else 0
    check = vetting.LegCheck(request, vocab_size, frozenset())
    finished = False
    sent_at = time.monotonic()
    first_at: float | None = None

    def violated(kind: str, detail: str) -> None:
        if violations is not None:
            violations.record(provider_id, kind, detail, request.request_id)

    try:
        await nc.publish(
            subjects.work(provider_id),
            bus.encode(request),
            reply=subjects.reply(provider_id, gateway_id, request.request_id),
        )
        ids: list[int] = []
        logprobs: list[float | None] = []
        margins: list[float | None] = []
        deadline = sent_at + timeout_s
        first = True
        while True:
            wait = accept_timeout_s if first else deadline - time.monotonic()
            if wait <= 0:
                return Reply(None, "timeout")
            frame = await stream.next(wait)
            if frame is None:
                return Reply(None, "no_answer" if first else "timeout")
            if first:
                first = False
                if isinstance(frame, bus.Accepted):
                    check.accepted(frame)
                    continue
            if isinstance(frame, bus.Failed):
                finished = True
                return Reply(None, frame.code)
            if isinstance(frame, bus.Accepted):
                return Reply(None, "provider_protocol_error")
            if isinstance(frame, bus.Delta):
                check.delta(frame)
                if frame.token_ids and first_at is None:
                    first_at = time.monotonic()
                ids.extend(frame.token_ids)
                if len(frame.logprobs) == len(frame.token_ids):
                    logprobs.extend(lp.logprob for lp in frame.logprobs)
                    margins.extend(margin(lp) for lp in frame.logprobs)
                else:
                    logprobs.extend([None] * len(frame.token_ids))
                    margins.extend([None] * len(frame.token_ids))
                continue
            done = check.done(frame)
            finished = True
            ended = time.monotonic()
            ttft = first_at - sent_at if first_at is not None else None
            decode = ended - first_at if first_at is not None else None
            if pool is not None and first_at is not None and decode is not None and ttft is not None:
                pool.note_first_token(provider_id, ttft)
                pool.note_decoding(provider_id, len(ids) - 1, decode)
            answer = Answer(tuple(ids), tuple(logprobs), tuple(margins), done.finish_reason)
            return Reply(answer, ttft_s=ttft, decode_s=decode)
    except StreamBroken as exc:
        if exc.violation is not None:
            violated(exc.violation, exc.message)
        return Reply(None, exc.code)
    except vetting.Violation as v:
        violated(v.kind, v.detail)
        return Reply(None, "provider_protocol_error")
    finally:
        for problem in check.problems:
            violated(problem.kind, problem.detail)
        router.close(stream)
        if pool is not None:
            pool.unwatch(provider_id, watch)
            pool.note_finished(provider_id, epoch)
        if not finished:
            with contextlib.suppress(Exception):
                await nc.publish(subjects.cancel(provider_id), bus.encode(bus.Cancel(request_id=request.request_id)))
