"""`mac-provider`: run the control plane, migrate the database, or bring up the local stack."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.app import SERVICES
from services.catalog import admin as models_admin
from services.providers import admin as providers_admin
from services.settings import Settings, SettingsError
from services.usage import admin as usage_admin

ALL = tuple(SERVICES)


def _serve(settings: Settings, services: list[str]) -> None:
    import uvicorn

    from services.app import create_app
    from services.logs import configure

    configure(json=settings.log_json, level=settings.log_level)
    uvicorn.run(
        create_app(settings, services),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,  # the gateway writes its own summary line per request
        timeout_graceful_shutdown=10,
        # uvicorn would otherwise take X-Forwarded-For / X-Forwarded-Proto from any client on
        # 127.0.0.1 and rewrite the peer address before we see it; MP_TRUSTED_PROXY_HOPS
        # (services/auth/client_ip.py) is the only authority on proxy headers.
        proxy_headers=False,
    )


async def _migrate(settings: Settings) -> None:
    import asyncpg

    from services.db.migrate import migrate

    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied migrations: {applied or 'none (up to date)'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mac-provider")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run control-plane services (all by default)")
    serve.add_argument("--service", action="append", choices=ALL, help="run only this service (repeatable)")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("up", help="start the whole local system (NATS, Postgres, control plane, one daemon)")
    admin = sub.add_parser("admin", help="operator commands (against DATABASE_URL)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    usage_admin.add_commands(admin_sub)
    providers_admin.add_commands(admin_sub)
    models_admin.add_commands(admin_sub)
    args = parser.parse_args(argv)
    if args.command == "up":
        from infra.stack import main as up

        return up()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"mac-provider: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        _serve(settings, args.service or list(ALL))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "admin" and args.admin_command == "providers":
        return asyncio.run(providers_admin.run(args, settings))
    elif args.command == "admin" and args.admin_command == "models":
        return asyncio.run(models_admin.run(args, settings))
    elif args.command == "admin":
        return asyncio.run(usage_admin.run(args, settings.database_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
