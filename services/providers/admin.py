"""`mac-provider admin providers list|pin|unpin|ban|unban|unsuspend|drain|undrain <id> [--note ...]`,
`mac-provider admin providers slots <id> N|default`,
`mac-provider admin providers token <id> [--name ...]` (a new `mpp_` token for an unattended Mac),
`mac-provider admin providers tokens <id>`, `mac-provider admin providers revoke-tokens <id>`.

Every change is a row in Postgres (DATABASE_URL); its trigger tells every
gateway replica at once. Drain and ban also reach the daemon over NATS (as the
control plane: NATS_URL, MP_NATS_USER, MP_NATS_PASSWORD), so it finishes what
it runs and takes nothing new.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from schemas import bus, subjects
from services.admin_nats import connect_as_control_plane
from services.providers import store, tokens
from services.settings import Settings

_CHANGES = {
    "pin": "admit at once and keep admitted (no provisional rate)",
    "unpin": "keep admitted, as provisional",
    "ban": "never route to it again; its running requests stop now",
    "unban": "admit it again, as provisional",
    "unsuspend": "admit again, as provisional, one suspended for protocol violations",
    "drain": "finish its running requests, route nothing new to it",
    "undrain": "route to it again (a drained daemon takes work again once restarted)",
}


def add_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    providers = admin.add_parser("providers", help="admission: list, pin, ban or drain providers")
    sub = providers.add_subparsers(dest="providers_command", required=True)
    listing = sub.add_parser("list", help="known providers, admitted first")
    listing.add_argument("--status", choices=store.STATUSES)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in _CHANGES.items():
        change = sub.add_parser(name, help=text)
        change.add_argument("provider_id")
        change.add_argument("--note", help="why (kept with the provider)")
        if name == "drain":
            change.add_argument(
                "--wait-s", type=float, default=5.0, help="how long to wait for the daemon to confirm (0: don't)"
            )
    token = sub.add_parser("token", help="make a provider token (mpp_) for a Mac set up without device login")
    token.add_argument("provider_id")
    token.add_argument("--name", help="what to call the Mac")
    tokens = sub.add_parser("tokens", help="a provider's tokens (prefixes, last used, revoked)")
    tokens.add_argument("provider_id")
    revoke = sub.add_parser("revoke-tokens", help="revoke every token of a provider (it is disconnected at once)")
    revoke.add_argument("provider_id")
    slots = sub.add_parser(
        "slots", help="the most slots gateways believe this provider has (default: MP_PROVIDER_MAX_SLOTS)"
    )
    slots.add_argument("provider_id")
    slots.add_argument("max_slots", help=f"0-{bus.MAX_SLOTS}, or 'default'")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    command: str = args.providers_command
    if command != "list" and not subjects.valid_token(args.provider_id):
        print(f"not a provider id: {args.provider_id!r} (1-64 of A-Z a-z 0-9 _ -)")
        return 2
    conn = await asyncpg.connect(settings.database_url)
    try:
        if command == "list":
            return await _list(conn, args)
        if command == "token":
            print(await tokens.mint(conn, args.provider_id, name=args.name))
            return 0
        if command == "tokens":
            return _print_tokens(await tokens.list_tokens(conn, provider_id=args.provider_id))
        if command == "revoke-tokens":
            print(f"provider {args.provider_id}: {await tokens.revoke_provider(conn, args.provider_id)} tokens revoked")
            return 0
        if command == "slots":
            return await _slots(conn, args.provider_id, args.max_slots, settings)
        return await _change(conn, settings, command, args.provider_id, args.note, getattr(args, "wait_s", 0.0))
    finally:
        await conn.close()


async def _list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    rows = await store.list_providers(conn, args.status)
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
        return 0
    print(
        f"{'provider':<32} {'status':<12} {'drain':<5} {'slots':>5} {'violations 24h/all':>18}  "
        f"{'last violation':<24} {'first seen (UTC)':<19}  {'last seen (UTC)':<19}  note"
    )
    for r in rows:
        violations = f"{r['violations_24h']}/{r['violations']}"
        print(
            f"{r['provider_id']:<32} {r['status']:<12} {'yes' if r['draining'] else '':<5} "
            f"{r['max_slots'] if r['max_slots'] is not None else '-':>5} {violations:>18}  "
            f"{r['last_violation'] or '-':<24} "
            f"{_when(r['first_seen']):<19}  {_when(r['last_seen']):<19}  {r['note']}"
        )
    print(f"({len(rows)} providers)")
    return 0


async def _slots(conn: asyncpg.Connection, pid: str, value: str, settings: Settings) -> int:
    if value == "default":
        cap = None
    elif value.isdigit() and int(value) <= bus.MAX_SLOTS:
        cap = int(value)
    else:
        print(f"max slots must be 0-{bus.MAX_SLOTS} or 'default', got {value!r}")
        return 2
    await store.set_max_slots(conn, pid, cap)
    shown = cap if cap is not None else f"the default ({settings.provider_max_slots})"
    print(f"provider {pid}: at most {shown} slots believed on every gateway")
    return 0


def _print_tokens(rows: list[tokens.TokenInfo]) -> int:
    print(f"{'id':>6}  {'token':<12} {'owner':>8}  {'created (UTC)':<19}  {'last used (UTC)':<19}  revoked (UTC)")
    for t in rows:
        owner = str(t.account_id) if t.account_id is not None else "operator"
        print(
            f"{t.token_id:>6}  {t.prefix + '…':<12} {owner:>8}  {_when(t.created_at):<19}  "
            f"{_when(t.last_used_at):<19}  {_when(t.revoked_at)}"
        )
    return 0


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


async def _change(
    conn: asyncpg.Connection, settings: Settings, command: str, pid: str, note: str | None, wait_s: float
) -> int:
    if command in ("pin", "ban"):
        row = await store.set_status(conn, pid, "pinned" if command == "pin" else "banned", note)
    elif command in ("unpin", "unban", "unsuspend"):
        was = {"unpin": "pinned", "unban": "banned", "unsuspend": "suspended"}[command]
        if not await store.change_status(conn, pid, from_status=was, to_status="provisional", note=note):
            print(f"provider {pid}: not {was}; nothing changed")
            return 1
        row = {"status": "provisional", "draining": False}
    else:
        row = await store.set_draining(conn, pid, command == "drain", note)
    print(f"provider {pid}: {row['status']}{', draining' if row['draining'] else ''} on every gateway")
    if command == "drain":
        confirmed = await _tell_daemon(settings, pid, note or "", wait_s)
        if wait_s > 0:
            print(
                f"provider {pid}: the daemon confirmed it is draining"
                if confirmed
                else f"provider {pid}: no word from the daemon within {wait_s:g} s (offline?); gateways skip it anyway"
            )
    elif command == "ban":
        # Best effort: a daemon that listens also stops working for nothing (gateways already cancelled).
        await _tell_daemon(settings, pid, note or "banned", 0.0)
    return 0


async def _tell_daemon(settings: Settings, pid: str, note: str, wait_s: float) -> bool:
    """Publish the drain order; with `wait_s`, wait for a heartbeat that says it is draining."""
    try:
        nc = await connect_as_control_plane(settings)
    except Exception as exc:
        print(f"provider {pid}: NATS unreachable ({type(exc).__name__}); the daemon was not told")
        return False
    confirmed = asyncio.Event()
    decoder = bus.decoder(bus.Heartbeat)

    async def on_heartbeat(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            if decoder.decode(msg.data).draining:
                confirmed.set()

    try:
        if wait_s > 0:
            await nc.subscribe(subjects.heartbeat(pid), cb=on_heartbeat)
        await nc.publish(subjects.drain(pid), bus.encode(bus.Drain(provider_id=pid, note=note)))
        await nc.flush()
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(confirmed.wait(), timeout=wait_s)
        return confirmed.is_set()
    finally:
        await nc.close()
