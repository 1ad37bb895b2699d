"""`mac-provider`: run the control plane, migrate the database, or bring up the local stack."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from services.app import SERVICES
from services.catalog import admin as models_admin
from services.natsauth import admin as natsauth_admin
from services.providers import admin as providers_admin
from services.settings import Settings, SettingsError, ensure_local_secrets
from services.usage import admin as usage_admin

ALL = tuple(SERVICES)


def _serve(settings: Settings, services: list[str]) -> None:
    from schemas.logs import configure
    from services.app import create_app
    from services.serving import serve

    configure(json=settings.log_json, level=settings.log_level)
    serve(create_app(settings, services), settings)


async def _migrate(settings: Settings) -> None:
    import asyncpg

    from services.db.migrate import migrate

    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied migrations: {applied or 'none (up to date)'}")


async def _check_migrated(settings: Settings, wait_s: float) -> int:
    """0 once the database has every migration this code ships; 3 if it still lacks some after `wait_s`.

    Changes nothing: a new version's pods wait here for the migration Job (infra/deploy).
    """
    import asyncpg

    from services.db.migrate import pending

    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn = await asyncpg.connect(settings.database_url, timeout=10)
            try:
                missing = await pending(conn)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            missing, problem = None, f"database unreachable ({type(exc).__name__})"
        else:
            problem = f"migrations not applied yet: {missing}"
        if missing == []:
            print("database schema up to date")
            return 0
        if time.monotonic() >= deadline:
            print(f"mac-provider: {problem}", file=sys.stderr)
            return 3
        await asyncio.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mac-provider")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run control-plane services (all by default)")
    serve.add_argument("--service", action="append", choices=ALL, help="run only this service (repeatable)")
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument(
        "--check", action="store_true", help="apply nothing; exit 0 if the database is up to date, 3 if not"
    )
    migrate.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="with --check: keep checking this long"
    )
    sub.add_parser("up", help="start the whole local system (NATS, Postgres, control plane, one daemon)")
    admin = sub.add_parser("admin", help="operator commands (against DATABASE_URL)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    usage_admin.add_commands(admin_sub)
    providers_admin.add_commands(admin_sub)
    natsauth_admin.add_commands(admin_sub)
    models_admin.add_commands(admin_sub)
    args = parser.parse_args(argv)
    if args.command == "up":
        from infra.stack import main as up

        return up()
    try:
        if args.command == "serve":
            ensure_local_secrets()
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"mac-provider: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        if "natsauth" in (args.service or []):
            from services.natsauth.service import check_settings

            try:
                check_settings(settings)
            except SettingsError as exc:
                print(f"mac-provider: {exc}", file=sys.stderr)
                return 2
        _serve(settings, args.service or list(ALL))
    elif args.command == "migrate" and args.check:
        return asyncio.run(_check_migrated(settings, args.wait))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "admin" and args.admin_command == "nats-callout":
        return natsauth_admin.run(settings)
    elif args.command == "admin" and args.admin_command == "providers":
        return asyncio.run(providers_admin.run(args, settings))
    elif args.command == "admin" and args.admin_command == "models":
        return asyncio.run(models_admin.run(args, settings))
    elif args.command == "admin":
        return asyncio.run(usage_admin.run(args, settings.database_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
