"""Device authorizations (RFC 8628) in Postgres: made, decided in the browser, polled, taken once.

A Mac asks for a code (`start`); its owner, signed in, approves or denies the short
user code (`decide`); the Mac polls with the long device code (`poll`) and, once
approved, gets a freshly minted provider token, exactly once: the poll locks the
row, so two racing polls are served one after the other and the second finds it
taken. Only a SHA-256 of the device code is stored.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass

import asyncpg

from schemas.device import MAX_INTERVAL_S, MAX_NAME, SLOW_DOWN_STEP_S, USER_CODE_ALPHABET, USER_CODE_LENGTH
from services.providers import tokens
from services.providers.tokens import Db

# token_urlsafe(32): 256 random bits in 43 characters.
_DEVICE_CODE = re.compile(r"^[A-Za-z0-9_-]{43}$")
# A poll this much sooner than the interval is too fast (some slack for the network and clocks).
_TOO_FAST = 0.8
# Rows are kept this long after they expire (a late poll still hears `expired_token`).
_KEEP_EXPIRED = "1 day"


# Control, format (bidi overrides, zero-width), surrogate, private-use and unassigned characters,
# and line/paragraph separators: a Mac's name is shown on pages and terminals as plain text.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def clean_mac_name(raw: str) -> str | None:
    """The name with blanks trimmed at both ends, or None if it is too long or holds a refused character."""
    name = raw.strip()
    if len(name) > MAX_NAME or any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in name):
        return None
    return name


def _hash(device_code: str) -> bytes:
    return hashlib.sha256(device_code.encode()).digest()


def new_user_code() -> str:
    return "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def well_formed_device_code(value: str) -> bool:
    return bool(_DEVICE_CODE.match(value))


@dataclass(frozen=True, slots=True)
class Started:
    device_code: str
    user_code: str
    expires_in: int
    interval: int


async def start(db: Db, *, ttl_s: int, interval_s: int, requested_name: str = "") -> Started:
    """A new device authorization; rows long expired are swept on the way."""
    device_code = secrets.token_urlsafe(32)
    for _ in range(5):
        user_code = new_user_code()
        try:
            await db.execute(
                f"""WITH swept AS (DELETE FROM device_authorizations
                                    WHERE expires_at < now() - interval '{_KEEP_EXPIRED}')
                   INSERT INTO device_authorizations
                          (device_code_hash, user_code, requested_name, expires_at, interval_s)
                   VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8), $5)""",
                _hash(device_code),
                user_code,
                requested_name,
                ttl_s,
                interval_s,
            )
        except asyncpg.UniqueViolationError:
            continue  # that user code is taken (1 in 2.6e10 per live code): draw another
        return Started(device_code, user_code, ttl_s, interval_s)
    raise RuntimeError("could not draw a free user code")


class Decision(enum.Enum):
    APPROVED = "approved"
    DENIED = "denied"
    # This account already decided this code.
    ALREADY = "already"
    # No live, undecided code like this (never made, expired, or decided by someone else).
    UNKNOWN = "unknown"


async def decide(db: Db, user_code: str, *, account_id: int, approve: bool, name: str) -> Decision:
    """Approve (naming the Mac) or deny a live code, for `account_id`; a code is decided once."""
    decided = await db.fetchval(
        """UPDATE device_authorizations
              SET account_id = $2,
                  approved_at = CASE WHEN $3 THEN now() END,
                  denied_at = CASE WHEN $3 THEN NULL ELSE now() END,
                  name = CASE WHEN $3 THEN coalesce(nullif($4, ''), nullif(requested_name, ''), 'Mac') END
            WHERE user_code = $1 AND expires_at > now() AND approved_at IS NULL AND denied_at IS NULL
           RETURNING id""",
        user_code,
        account_id,
        approve,
        name,
    )
    if decided is not None:
        return Decision.APPROVED if approve else Decision.DENIED
    mine = await db.fetchval(
        "SELECT true FROM device_authorizations WHERE user_code = $1 AND account_id = $2 AND expires_at > now()",
        user_code,
        account_id,
    )
    return Decision.ALREADY if mine else Decision.UNKNOWN


class Poll(enum.Enum):
    PENDING = "authorization_pending"
    SLOW_DOWN = "slow_down"
    DENIED = "access_denied"
    EXPIRED = "expired_token"
    # Unknown, or already exchanged.
    INVALID = "invalid_grant"
    GRANTED = "granted"


@dataclass(frozen=True, slots=True)
class Grant:
    token: str
    provider_id: str
    name: str
    account_id: int

    def __repr__(self) -> str:
        return f"Grant(provider_id={self.provider_id!r}, name={self.name!r}, token=<redacted>)"


@dataclass(frozen=True, slots=True)
class PollResult:
    outcome: Poll
    # The seconds the client must now leave between polls (after a slow_down, the raised one).
    interval: int = 0
    grant: Grant | None = None
    # False when no row has this device code: a guess, as far as anyone can tell.
    found: bool = True


async def poll(db: asyncpg.Pool, device_code: str) -> PollResult:
    """One poll of the device token endpoint, decided and recorded atomically (the row is locked)."""
    if not well_formed_device_code(device_code):
        return PollResult(Poll.INVALID, found=False)
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """SELECT id, account_id, name, approved_at IS NOT NULL AS approved, denied_at IS NOT NULL AS denied,
                      consumed_at IS NOT NULL AS consumed, expires_at <= now() AS expired, interval_s,
                      last_polled_at IS NOT NULL
                        AND now() - last_polled_at < make_interval(secs => interval_s * $2::float8) AS too_fast
                 FROM device_authorizations WHERE device_code_hash = $1
                  FOR UPDATE""",
            _hash(device_code),
            _TOO_FAST,
        )
        if row is None:
            return PollResult(Poll.INVALID, found=False)
        if row["consumed"]:
            return PollResult(Poll.INVALID)
        if row["expired"]:
            return PollResult(Poll.EXPIRED)
        if row["too_fast"]:
            # RFC 8628 §3.5: this and every later poll must wait 5 s longer.
            interval: int = await conn.fetchval(
                """UPDATE device_authorizations SET interval_s = least(interval_s + $2, $3), last_polled_at = now()
                    WHERE id = $1 RETURNING interval_s""",
                row["id"],
                SLOW_DOWN_STEP_S,
                MAX_INTERVAL_S,
            )
            return PollResult(Poll.SLOW_DOWN, interval=interval)
        await conn.execute("UPDATE device_authorizations SET last_polled_at = now() WHERE id = $1", row["id"])
        if row["denied"]:
            return PollResult(Poll.DENIED, interval=row["interval_s"])
        if not row["approved"]:
            return PollResult(Poll.PENDING, interval=row["interval_s"])
        # Approved and not yet taken: the token is minted and the code spent in this one transaction.
        provider_id = tokens.new_provider_id()
        token = await tokens.mint(conn, provider_id, account_id=row["account_id"], name=row["name"])
        await conn.execute(
            "UPDATE device_authorizations SET consumed_at = now(), provider_id = $2 WHERE id = $1",
            row["id"],
            provider_id,
        )
        grant = Grant(token=token, provider_id=provider_id, name=row["name"], account_id=row["account_id"])
        return PollResult(Poll.GRANTED, interval=row["interval_s"], grant=grant)
