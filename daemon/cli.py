"""`mac-provider-daemon`: serve this machine's model to the pool (and to its owner on 127.0.0.1).

Configured from the environment and an optional config file of `KEY=value`
lines (`--config` or MP_CONFIG): NATS_URL, MP_PROVIDER_ID, MP_MODEL_PATH,
MP_MODEL_ID, MP_SLOTS, MP_MEMORY_BUDGET_GB, MP_IDLE_UNLOAD_S, ... (see README).
`login` signs this Mac in to a pool (device login in the browser; daemon/login.py) and keeps
its provider token; `doctor` checks the machine and the configuration and says what to fix.
`status` shows this Mac as the daemon and the pool see it, and why it gets no traffic.
`prepare-default-model` makes the default model's folder (in MP_MODELS_DIR, the one
place `/admin/load` loads from) and prints its path. `serve` makes the admin API's token
file (MP_ADMIN_TOKEN_FILE, 0600) at first start and exits 2 if it is unusable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvloop

from daemon.settings import DaemonSettings, SettingsError
from schemas.logs import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mac-provider-daemon", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the configured model (default)")
    doctor = sub.add_parser("doctor", help="check this machine and the configuration")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    status = sub.add_parser("status", help="this Mac: the daemon's state and the pool's view (why no traffic?)")
    status.add_argument("--json", action="store_true", help="print both views as JSON")
    prep = sub.add_parser("prepare-default-model", help="make the SmolLM2 model folder and print its path")
    login = sub.add_parser("login", help="sign this Mac in to a pool (approve it in your browser)")
    login.add_argument("--url", default=None, help="the pool's control plane, https://… (default: MP_CONTROL_URL)")
    login.add_argument("--name", default=None, help="a name for this Mac (default: its host name)")
    for p in (serve, doctor, status, prep, login):
        p.add_argument("--config", type=Path, default=None, help="a file of KEY=value settings (MP_CONFIG)")
    prep.add_argument(
        "--models-dir", type=Path, default=None, help="default: the daemon's models folder (MP_MODELS_DIR)"
    )
    args = parser.parse_args(argv)
    if args.command == "login":
        # Before the daemon's settings: login is how a missing or broken credentials file gets fixed.
        from daemon.login import main as login_main

        return login_main(args.url, args.name, args.config)

    try:
        settings = DaemonSettings.from_env(config_file=getattr(args, "config", None))
    except SettingsError as exc:
        print(f"mac-provider-daemon: {exc}", file=sys.stderr)
        return 2
    if args.command == "prepare-default-model":
        from daemon.models.smollm2 import ensure_smollm2

        # In the models folder by default: the one place /admin/load may load from.
        print(ensure_smollm2(args.models_dir or settings.models_dir))
        return 0
    if args.command == "status":
        from daemon.status import run_status

        return run_status(settings, dict(os.environ), as_json=args.json)
    if args.command == "doctor":
        from daemon.doctor import run_doctor

        return run_doctor(settings, as_json=args.json)
    configure(json=settings.log_json, level=settings.log_level)
    from daemon.admin.token import AdminTokenError
    from daemon.runtime import serve as serve_daemon

    try:
        # uvloop, as the control plane runs on: every token this Mac serves is a NATS publish, and every
        # request a read, a task and a flush; asyncio's own loop took ~100 us longer per request to
        # Accepted (tests/bench hotpath's timeline, c=1).
        uvloop.run(serve_daemon(settings))
    except AdminTokenError as exc:
        # Refused, not repaired: a token others could read may already be known to them.
        print(f"mac-provider-daemon: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
