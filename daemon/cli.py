"""`mac-provider-daemon`: serve this machine's model to the pool.

Configured from the environment (NATS_URL, MP_PROVIDER_ID, MP_MODEL_PATH,
MP_MODEL_ID, MP_ENGINE, ...). `prepare-default-model` makes the default model's
folder and prints its path.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from daemon.engine.base import Engine
from daemon.logs import configure
from daemon.provider import Provider
from daemon.settings import DaemonSettings, SettingsError

log = structlog.get_logger("daemon")


def build_engine(settings: DaemonSettings) -> Engine:
    if settings.engine == "synthetic":
        from daemon.engine.synthetic import SyntheticEngine

        return SyntheticEngine(settings.model_id)
    from daemon.engine.mlx_engine import MlxEngine

    assert settings.model_path is not None
    return MlxEngine(settings.model_path, settings.model_id, queue_limit=settings.queue_limit)


async def serve(settings: DaemonSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine = build_engine(settings)
    await engine.start()
    try:
        await Provider(settings, engine).run(stop)
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mac-provider-daemon", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the configured model (default)")
    prep = sub.add_parser("prepare-default-model", help="make the SmolLM2 model folder and print its path")
    prep.add_argument("--models-dir", type=Path, default=Path(".mp/models"))
    args = parser.parse_args(argv)

    if args.command == "prepare-default-model":
        from daemon.models.smollm2 import ensure_smollm2

        print(ensure_smollm2(args.models_dir))
        return 0
    try:
        settings = DaemonSettings.from_env()
    except SettingsError as exc:
        print(f"mac-provider-daemon: {exc}", file=sys.stderr)
        return 2
    configure(json=settings.log_json, level=settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
