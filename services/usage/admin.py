"""Operator commands: `mac-provider admin feedback ...` and `mac-provider admin quota ...`."""

from __future__ import annotations

import argparse

import asyncpg
import msgspec

from services.usage.reports import recent_feedback


def add_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fb = admin.add_parser("feedback", help="list recent buyer ratings for review")
    fb.add_argument("--model")
    fb.add_argument("--provider")
    fb.add_argument("--rating", type=int, choices=range(1, 6))
    fb.add_argument("--limit", type=int, default=50)
    fb.add_argument("--json", action="store_true", help="one JSON object per line")
    quota = admin.add_parser("quota", help="show or override an account's quotas (omit a value to keep it)")
    quota.add_argument("--account", type=int, required=True)
    quota.add_argument("--requests-per-day", type=int)
    quota.add_argument("--tokens-per-day", type=int)
    quota.add_argument("--concurrent", type=int)
    quota.add_argument("--reset", action="store_true", help="drop the override: back to the defaults")


async def run(args: argparse.Namespace, database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        if args.admin_command == "feedback":
            return await _feedback(conn, args)
        return await _quota(conn, args)
    finally:
        await conn.close()


async def _feedback(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    rows = await recent_feedback(
        conn,  # type: ignore[arg-type]
        model=args.model,
        provider=args.provider,
        rating=args.rating,
        limit=args.limit,
    )
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
        return 0
    print(f"{'when (UTC)':<20} {'rating':>6}  {'model':<28} {'provider':<16} {'account':>7}  comment")
    for r in rows:
        comment = r.comment.replace("\n", " ")
        print(
            f"{r.updated_at[:19]:<20} {r.rating:>6}  {r.model[:28]:<28} {(r.provider_id or '-')[:16]:<16} "
            f"{r.account_id or '-':>7}  {comment[:80]}"
        )
    print(f"({len(rows)} ratings)")
    return 0


async def _quota(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.reset:
        await conn.execute("DELETE FROM account_quotas WHERE account_id = $1", args.account)
    elif any(v is not None for v in (args.requests_per_day, args.tokens_per_day, args.concurrent)):
        await conn.execute(
            """INSERT INTO account_quotas (account_id, requests_per_day, tokens_per_day, concurrent)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (account_id) DO UPDATE SET
                 requests_per_day = coalesce($2, account_quotas.requests_per_day),
                 tokens_per_day = coalesce($3, account_quotas.tokens_per_day),
                 concurrent = coalesce($4, account_quotas.concurrent),
                 updated_at = now()""",
            args.account,
            args.requests_per_day,
            args.tokens_per_day,
            args.concurrent,
        )
    row = await conn.fetchrow("SELECT * FROM account_quotas WHERE account_id = $1", args.account)
    if row is None:
        print(f"account {args.account}: default quotas")
    else:
        shown = {
            k: "default" if row[k] is None else row[k] for k in ("requests_per_day", "tokens_per_day", "concurrent")
        }
        print(
            f"account {args.account}: requests/day={shown['requests_per_day']} "
            f"tokens/day={shown['tokens_per_day']} concurrent={shown['concurrent']}"
        )
    return 0
