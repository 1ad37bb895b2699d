"""GET /v1/usage and POST /v1/feedback."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
from asyncpg import Record
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from msgspec import Meta

from schemas.limits import ISSUED_ID_PATTERN, PLAIN_TEXT_PATTERN
from services.auth.bearer import authenticate, bearer_token
from services.auth.declared import Auth, requires
from services.errors import InvalidRequest, NotFound
from services.gateway.requests import decode_body
from services.openapi import documented
from services.runtime import Runtime
from services.usage import quotas, reports
from services.usage.metering import holder_for, quota_headers, rate_limit_headers

MAX_DAYS = 90
# How long a report or a rating waits for the caller's just-ended requests to reach the ledger.
READ_YOUR_WRITES_S = 2.0
# Each surface's answer id is the request id behind a prefix (chat, text completion, Messages, Responses).
_ANSWER_ID_PREFIXES = ("chatcmpl-", "cmpl-", "msg_", "resp_")
MAX_COMMENT = 2000


def _days(raw: str | None) -> int:
    if raw is None:
        return 7
    try:
        days = int(raw)
    except ValueError:
        raise InvalidRequest("Invalid value for 'days': expected a whole number.", param="days") from None
    if not 1 <= days <= MAX_DAYS:
        raise InvalidRequest(f"Invalid value for 'days': must be between 1 and {MAX_DAYS}.", param="days")
    return days


@get(
    "/v1/usage",
    **documented(ok=reports.UsageReport, errors=(400, 401, 403, 429, 500)),
    **requires(Auth.API_KEY_OR_DEMO),
)
async def usage(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[reports.UsageReport]:
    """The caller's own usage: an API key's account (and that key), or a demo token's own subject."""
    principal = await authenticate(request, runtime, allow_demo=True)
    days = _days(request.query_params.get("days"))
    holder, defaults = holder_for(principal, runtime.settings)
    # The buyer's requests that just ended are in the report (their settlements may still be on the way).
    await runtime.metering.caught_up(READ_YOUR_WRITES_S)
    current = await quotas.snapshot(runtime.db, holder, defaults)
    since = dt.datetime.combine(current.window_day - dt.timedelta(days=days - 1), dt.time(), tzinfo=dt.UTC)
    key, demo_token = None, None
    if principal.key_id is not None:
        prefix: str = await runtime.db.fetchval("SELECT prefix FROM api_keys WHERE id = $1", principal.key_id)
        today = await reports.key_requests_today(runtime.db, principal.key_id, current.window_day)
        key = reports.KeyInfo(id=principal.key_id, prefix=prefix, requests_today=today)
    else:
        assert principal.demo_token_id is not None
        claims = runtime.demo.verify(bearer_token(request))
        demo_token = reports.DemoTokenInfo(id=principal.demo_token_id, expires_at=claims.expires_at)
    report = reports.UsageReport(
        account_id=principal.account_id,
        key=key,
        demo_token=demo_token,
        window=reports.Window(
            day=current.window_day.isoformat(),
            resets_at=current.resets_at.isoformat(),
            resets_in_s=current.seconds_to_reset(),
        ),
        quotas=reports.quotas_of(current),
        days=days,
        by_model=await reports.by_model(runtime.db, holder.subject, since),
        ratings=await reports.ratings(runtime.db, holder.subject, since),
    )
    return Response(report, headers=rate_limit_headers(current))


class FeedbackRequest(msgspec.Struct, frozen=True):
    # Ids we issue are letters, digits, "-" and "_"; anything else (a NUL) must not reach Postgres.
    request_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=ISSUED_ID_PATTERN)]
    # 1 (bad) to 5 (excellent).
    rating: Annotated[int, Meta(ge=1, le=5)]
    # Shown to operators later: no NUL (Postgres refuses it in text) nor other control characters.
    comment: Annotated[str, Meta(max_length=MAX_COMMENT, pattern=PLAIN_TEXT_PATTERN)] = ""


class FeedbackRecord(msgspec.Struct, frozen=True):
    request_id: str
    rating: int
    comment: str
    replaced: bool
    object: str = "feedback"


@post(
    "/v1/feedback",
    status_code=200,
    **documented(ok=FeedbackRecord, body=FeedbackRequest, errors=(400, 401, 403, 404, 413, 429, 500)),
    **requires(Auth.API_KEY_OR_DEMO),
)
async def feedback(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[FeedbackRecord]:
    principal = await authenticate(request, runtime, allow_demo=True)
    holder, _ = holder_for(principal, runtime.settings)
    body = decode_body(await request.body(), FeedbackRequest)
    # Buyers may paste the completion id; the request id is its suffix.
    request_id = body.request_id
    for prefix in _ANSWER_ID_PREFIXES:
        request_id = request_id.removeprefix(prefix)
    row = await _rate(runtime, request_id, holder.subject, body)
    if row is None and await runtime.metering.caught_up(READ_YOUR_WRITES_S):
        # Rated at once: its settlement may have been on its way to the ledger.
        row = await _rate(runtime, request_id, holder.subject, body)
    if row is None:
        # 404 whether the id does not exist or is someone else's: ids are not probeable.
        raise NotFound(f"No finished request {body.request_id!r} on your account.", param="request_id")
    record = FeedbackRecord(request_id=request_id, rating=body.rating, comment=body.comment, replaced=row["replaced"])
    return Response(record, headers=await quota_headers(runtime.db, principal, runtime.settings))


async def _rate(runtime: Runtime, request_id: str, subject: str, body: FeedbackRequest) -> Record | None:
    row: Record | None = await runtime.db.fetchrow(
        """WITH mine AS (SELECT request_id FROM usage_ledger WHERE request_id = $1 AND subject = $2)
           INSERT INTO feedback (request_id, rating, comment)
           SELECT request_id, $3, $4 FROM mine
           ON CONFLICT (request_id) DO UPDATE SET rating = EXCLUDED.rating, comment = EXCLUDED.comment,
                                                  updated_at = now()
           RETURNING (xmax <> 0) AS replaced""",
        request_id,
        subject,
        body.rating,
        body.comment,
    )
    return row
