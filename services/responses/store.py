"""Stored responses in Postgres: owned by an account, expiring after MP_RESPONSE_TTL_S.

Another account's id reads exactly like an unknown or expired one, so ids cannot be probed.
Expired rows are invisible at once and deleted a few at a time by later writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg
import msgspec

from schemas import responses

_ENCODER = msgspec.json.Encoder()
_INPUT = msgspec.json.Decoder(list[responses.InputItem])
_RESPONSE = msgspec.json.Decoder(responses.Response)
# Expired rows each write clears: enough to keep up, small enough never to slow a request.
_SWEEP = 20
# What our ids look like (resp_ + hex); anything else is unknown without a query (and NUL never reaches Postgres).
_ID = re.compile(r"^resp_[0-9a-f]{1,64}$")


@dataclass(frozen=True)
class Stored:
    response: responses.Response
    # The conversation the response answered, without its output.
    input: list[responses.InputItem]


def encoded_size(items: list[responses.InputItem]) -> int:
    return len(_ENCODER.encode(items))


async def save(
    db: asyncpg.Pool,
    account_id: int,
    items: list[responses.InputItem],
    response: responses.Response,
    *,
    ttl_s: float,
) -> None:
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO stored_responses (id, account_id, input, response, expires_at) "
            "VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
            response.id,
            account_id,
            _ENCODER.encode(items),
            _ENCODER.encode(response),
            ttl_s,
        )
        await conn.execute(
            "DELETE FROM stored_responses WHERE id IN "
            "(SELECT id FROM stored_responses WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
            _SWEEP,
        )


async def load(db: asyncpg.Pool, account_id: int, response_id: str) -> Stored | None:
    if not _ID.match(response_id):
        return None
    row = await db.fetchrow(
        "SELECT input, response FROM stored_responses WHERE id = $1 AND account_id = $2 AND expires_at > now()",
        response_id,
        account_id,
    )
    if row is None:
        return None
    return Stored(response=_RESPONSE.decode(row["response"]), input=_INPUT.decode(row["input"]))


async def delete(db: asyncpg.Pool, account_id: int, response_id: str) -> bool:
    if not _ID.match(response_id):
        return False
    status = await db.execute(
        "DELETE FROM stored_responses WHERE id = $1 AND account_id = $2 AND expires_at > now()",
        response_id,
        account_id,
    )
    return status != "DELETE 0"
