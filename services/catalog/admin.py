"""`mac-provider admin models list|allow|revoke|trust|canaries`: the operator's model catalog.

- `list [--all] [--json]`: the catalog (which weights identities each public model id may be
  served as), then every provider's models as the gateways judge them (verified, or why not).
- `allow <model_id> <sha256> [--note ...]` / `revoke <model_id> <sha256>`: one entry.
- `trust <provider_id> [<model_id>]`: list, in one command, the identities a pinned provider
  reports for its models (or for that one) now, read from its heartbeat over NATS as the
  control plane, and record its canary answers as the references for those weights.
- `canaries [<provider_id>]`: recent canary runs.

Every change is a row in Postgres (DATABASE_URL) whose trigger tells every gateway replica at
once. Who made it is `--by`, else MP_OPERATOR, else the login running the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import secrets
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client as Nats

from schemas import bus, subjects
from services.admin_nats import connect_as_control_plane
from services.canary import prompts
from services.canary import store as canary_store
from services.canary.probe import ask
from services.catalog import store
from services.gateway.replies import ReplyRouter
from services.settings import Settings

# How often reference recording tells the provider it is still there (a gateway's MP_GATEWAY_KEEPALIVE_MS).
ADMIN_KEEPALIVE_MS = 2000


def add_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = admin.add_parser("models", help="the model catalog: which weights may be served as which model id")
    sub = models.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="the catalog, and how every provider's models fare against it")
    listing.add_argument("--all", action="store_true", help="revoked entries too")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (("allow", "serve these weights as this model id"), ("revoke", "stop serving them as it")):
        change = sub.add_parser(name, help=text)
        change.add_argument("model_id")
        change.add_argument("sha256", help="the weights' identity (64 hex digits, as daemons report it)")
        change.add_argument("--by", help="who (default: MP_OPERATOR or your login)")
        if name == "allow":
            change.add_argument("--note", default="", help="why (kept with the entry)")
    trust = sub.add_parser("trust", help="list what a pinned provider serves now, and record its canary answers")
    trust.add_argument("provider_id")
    trust.add_argument("model_id", nargs="?", help="only this model (default: all it serves)")
    trust.add_argument("--by", help="who (default: MP_OPERATOR or your login)")
    trust.add_argument("--note", default="", help="why (kept with the entries)")
    trust.add_argument("--wait-s", type=float, default=15.0, help="how long to wait for its heartbeat")
    trust.add_argument("--no-reference", action="store_true", help="do not record canary references now")
    canaries = sub.add_parser("canaries", help="recent canary runs")
    canaries.add_argument("provider_id", nargs="?")
    canaries.add_argument("--limit", type=int, default=30)


def _operator(args: argparse.Namespace, settings: Settings) -> str:
    who = args.by or settings.operator
    if not who:
        with contextlib.suppress(Exception):
            who = getpass.getuser()
    return (who or "operator")[:256]


def _checked(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, if anything."""
    model_id = getattr(args, "model_id", None)
    if model_id is not None and not store.MODEL_ID.match(model_id):
        return f"not a model id: {model_id!r} (1-256 characters, no whitespace, control characters, * or >)"
    sha = getattr(args, "sha256", None)
    if sha is not None and not store.SHA256.match(sha.lower()):
        return f"not a SHA-256: {sha!r} (64 hex digits)"
    pid = getattr(args, "provider_id", None)
    if pid is not None and not subjects.valid_token(pid):
        return f"not a provider id: {pid!r} (1-64 of A-Z a-z 0-9 _ -)"
    return None


async def run(args: argparse.Namespace, settings: Settings) -> int:
    problem = _checked(args)
    if problem is not None:
        print(problem)
        return 2
    command: str = args.models_command
    conn = await asyncpg.connect(settings.database_url)
    try:
        if command == "list":
            return await _list(conn, args)
        if command == "allow":
            sha = args.sha256.lower()
            added = await store.allow(conn, args.model_id, sha, added_by=_operator(args, settings), note=args.note)
            state = "listed" if added else "already listed"
            print(f"{args.model_id}: weights {args.sha256.lower()} {state}; every gateway routes them")
            return 0
        if command == "revoke":
            if not await store.revoke(conn, args.model_id, args.sha256.lower(), revoked_by=_operator(args, settings)):
                print(f"{args.model_id}: weights {args.sha256.lower()} were not listed; nothing changed")
                return 1
            print(f"{args.model_id}: weights {args.sha256.lower()} revoked; no gateway routes them any more")
            return 0
        if command == "canaries":
            return _print_runs(await canary_store.runs(conn, args.provider_id, limit=max(1, min(args.limit, 1000))))
        return await _trust(conn, settings, args)
    finally:
        await conn.close()


# ---- list ---------------------------------------------------------------------------------------


async def _list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    entries = await store.entries(conn, include_revoked=args.all)
    models = await store.provider_models(conn)
    if args.json:
        for e in entries:
            print(msgspec.json.encode({"kind": "catalog", **dataclasses.asdict(e)}).decode())
        for m in models:
            print(msgspec.json.encode({"kind": "provider_model", **m}).decode())
        return 0
    print(f"{'model':<32} {'weights sha256':<64}  {'added (UTC)':<19}  {'by':<16} {'from provider':<20} note")
    for e in entries:
        revoked = f" [revoked {_when(e.revoked_at)} by {e.revoked_by}]" if e.revoked_at else ""
        print(
            f"{e.model_id:<32} {e.weights_sha256:<64}  {_when(e.added_at):<19}  {e.added_by[:16]:<16} "
            f"{e.source_provider or '-':<20} {e.note}{revoked}"
        )
    print(f"({len(entries)} catalog entries)\n")
    print(f"{'provider':<24} {'model':<32} {'status':<15} {'routed':<6} {'weights':<13} {'since (UTC)':<19}  detail")
    for m in models:
        sha = (m["weights_sha256"][:12] + "…") if m["weights_sha256"] else "-"
        print(
            f"{m['provider_id']:<24} {m['model_id'][:32]:<32} {m['status']:<15} {'yes' if m['routed'] else 'no':<6} "
            f"{sha:<13} {_when(m['updated_at']):<19}  {m['detail']}"
        )
    print(f"({len(models)} provider models)")
    return 0


def _print_runs(rows: list[dict[str, Any]]) -> int:
    print(
        f"{'at (UTC)':<19}  {'provider':<24} {'model':<28} {'result':<12} {'compared':>8} {'ttft ms':>8} "
        f"{'tok/s':>7}  detail"
    )
    for r in rows:
        ttft = f"{r['ttft_ms']:.0f}" if r["ttft_ms"] is not None else "-"
        tps = f"{r['decode_tps']:.1f}" if r["decode_tps"] is not None else "-"
        print(
            f"{_when(r['at']):<19}  {r['provider_id']:<24} {r['model_id'][:28]:<28} {r['result']:<12} "
            f"{r['tokens_compared']:>8} {ttft:>8} {tps:>7}  {r['detail']}"
        )
    return 0


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


# ---- trust --------------------------------------------------------------------------------------


class NotPinned(Exception):
    pass


async def trust(
    conn: asyncpg.Connection,
    nc: Nats,
    provider_id: str,
    model_id: str | None,
    *,
    added_by: str,
    note: str = "",
    wait_s: float = 15.0,
) -> list[tuple[bus.ModelInfo, bool]] | None:
    """List the weights a pinned provider reports now (all its models, or `model_id`) in the catalog.

    Returns each model and whether it was newly listed; None if no heartbeat with weights hashes
    came within `wait_s`. NotPinned if the provider is not pinned: only a provider the operator
    vouched for may vouch for weights.
    """
    status = await conn.fetchval("SELECT status FROM providers WHERE provider_id = $1", provider_id)
    if status != "pinned":
        raise NotPinned(
            f"provider {provider_id} is {status or 'unknown'}, not pinned: only a pinned provider vouches "
            f"for weights (mac-provider admin providers pin {provider_id})"
        )
    models = await trusted_models(nc, provider_id, model_id, wait_s=wait_s)
    if models is None:
        return None
    listed = []
    for m in models:
        added = await store.allow(
            conn,
            m.id,
            m.weights_sha256,
            added_by=added_by,
            note=note or f"trusted from pinned provider {provider_id}",
            source_provider=provider_id,
        )
        listed.append((m, added))
    return listed


async def _trust(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> int:
    pid: str = args.provider_id
    try:
        nc = await connect_as_control_plane(settings)
    except Exception as exc:
        print(f"NATS unreachable ({type(exc).__name__}): cannot read provider {pid}'s heartbeat")
        return 1
    try:
        try:
            listed = await trust(
                conn, nc, pid, args.model_id, added_by=_operator(args, settings), note=args.note, wait_s=args.wait_s
            )
        except NotPinned as exc:
            print(exc)
            return 1
        if listed is None:
            what = f"{args.model_id!r} with its weights hash" if args.model_id else "its models with weights hashes"
            print(f"provider {pid}: no heartbeat reporting {what} within {args.wait_s:g} s (offline? still hashing?)")
            return 1
        for m, added in listed:
            print(f"{m.id}: weights {m.weights_sha256} {'listed' if added else 'already listed'} (from {pid})")
        if not args.no_reference:
            for m, _ in listed:
                recorded = await record_references(
                    nc, conn, pid, m, tokens=settings.canary_tokens, deadline_s=settings.request_timeout_s
                )
                print(f"{m.id}: {recorded} canary references recorded from {pid}")
        return 0
    finally:
        await nc.close()


async def trusted_models(
    nc: Nats,
    provider_id: str,
    model_id: str | None,
    *,
    wait_s: float,
) -> list[bus.ModelInfo] | None:
    """The models (or the one) a provider reports with a weights hash, from its next heartbeat; None if none came."""
    decoder = bus.decoder(bus.Heartbeat)
    found: asyncio.Future[list[bus.ModelInfo]] = asyncio.get_running_loop().create_future()

    async def on_heartbeat(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            hb = decoder.decode(msg.data)
            chosen = [m for m in hb.models if model_id is None or m.id == model_id]
            complete = chosen and all(m.weights_sha256 for m in chosen)
            if hb.provider_id == provider_id and complete and not found.done():
                found.set_result(chosen)

    sub = await nc.subscribe(subjects.heartbeat(provider_id), cb=on_heartbeat)
    try:
        await nc.publish(subjects.PROBE, bus.encode(bus.Probe(gateway_id=f"admin-{secrets.token_hex(4)}")))
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(found, timeout=wait_s)
        return None
    finally:
        await sub.unsubscribe()


async def record_references(
    nc: Nats, conn: asyncpg.Connection, provider_id: str, model: bus.ModelInfo, *, tokens: int, deadline_s: float
) -> int:
    """Ask the provider every canary prompt it has no reference for yet, and record its answers."""
    gateway_id = f"gw-{secrets.token_hex(4)}"
    # Asked as a gateway asks: it says it is still there while the provider answers.
    router = ReplyRouter(nc, gateway_id, keepalive_ms=ADMIN_KEEPALIVE_MS)
    await router.start()
    try:
        existing = await canary_store.references(conn, model.weights_sha256)
        recorded = 0
        for prompt in prompts.PROMPTS:
            key = prompts.prompt_key(prompt, tokens)
            if key in existing:
                continue
            request = prompts.request(model.id, prompt, tokens, deadline_s=deadline_s, keepalive_ms=router.keepalive_ms)
            reply = await ask(nc, router, gateway_id, provider_id, request, vocab_size=model.vocab_size)
            if reply.answer is None or not reply.answer.token_ids:
                print(f"{model.id}: no answer to a canary prompt ({reply.error or 'empty'}); not recorded")
                continue
            await canary_store.record_reference(conn, model.weights_sha256, key, reply.answer, provider_id)
            recorded += 1
        return recorded
    finally:
        await router.stop()
