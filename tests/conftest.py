"""Session fixtures: a real nats-server, a real PostgreSQL, a tiny real mlx-lm model,
and the control plane plus a provider daemon running as the same processes a user runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.components import start_gateway, start_natsauth, wait_model
from infra.devkey import ensure_dev_key
from infra.nats import NatsServer
from infra.nats_auth import SecuredNats
from infra.ports import free_port
from infra.postgres import PostgresServer
from tests.support.auth_stack import auth_stack  # noqa: F401  (registered here once: one set of replicas for all modules)
from tests.support.daemons import spawn_daemon
from tests.support.stack import REPO, TINY_MODEL, TINY_PROVIDER, Stack
from tests.support.tiny_model import write_tiny_model

# The suite starts dozens of daemons with new provider ids within a minute; every gateway it
# starts admits them freely. The admission rate itself is tested on its own stack (test_admission.py).
os.environ.setdefault("MP_PROVISIONAL_ADMISSIONS_PER_MIN", "100000")
# Likewise, the suite's clients all share 127.0.0.1 (or a few test addresses): the per-client
# abuse budgets are tested on gateways of their own (test_client_limits.py).
for _name in ("MP_FAILED_AUTH_PER_MIN", "MP_GITHUB_START_PER_MIN", "MP_DEMO_TOKENS_PER_NET64", "MP_DEMO_TOKENS_GLOBAL"):
    os.environ.setdefault(_name, "100000")
# Each prepare helper process costs about a second of CPU to start, and the suite starts dozens of
# daemons on 2 cores: one helper each is plenty for its load. test_hostile_buyer.py runs the default two.
os.environ.setdefault("MP_PREPARE_HELPERS", "1")
# The suite's daemons serve dozens of random tiny models the operator catalog does not list: its
# gateways route them unverified. test_verified_models.py proves the production default (refuse)
# on a gateway of its own, and catalogues the models it checks.
os.environ.setdefault("MP_UNCATALOGUED_MODELS", "allow")
# A provider joining with catalogued weights gets its first canary within half a second (not 30 s).
os.environ.setdefault("MP_CANARY_JOIN_DELAY_S", "0.5")


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mp-home")


@pytest.fixture(scope="session")
def postgres(state_dir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer.start(state_dir / "postgres", fast=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(state_dir: Path, postgres: PostgresServer) -> Iterator[SecuredNats]:
    """NATS with the auth callout on, as deployed: the gateway logs in as the control plane and every
    daemon a test starts with its own provider token (minted in Postgres when first started).

    The callout is answered by a `serve --service natsauth` process of its own, so tests of the bus
    and of daemons need no gateway; the session's gateway answers it too (a second replica)."""
    server = SecuredNats.start(state_dir / "nats", database_url=postgres.url)
    try:
        responder = start_natsauth(state_dir, nats=server, database_url=postgres.url)
    except BaseException:
        server.stop()
        raise
    yield server
    responder.stop()
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_path(state_dir: Path) -> Path:
    # Seed 3 writes mostly readable text, which keeps assertion messages legible.
    # A long context so that tests can ask for generations that outlast them (cancellation).
    return write_tiny_model(state_dir / "models" / TINY_MODEL, seed=3, context_length=1 << 16)


@pytest.fixture(scope="session")
def stack(
    state_dir: Path, nats_server: SecuredNats, postgres: PostgresServer, tiny_model_path: Path
) -> Iterator[Stack]:
    api_key = asyncio.run(ensure_dev_key(postgres.url, state_dir / "dev.env"))
    port = free_port()
    gateway = start_gateway(
        state_dir,
        port=port,
        nats=nats_server,
        database_url=postgres.url,
        # Short silences so tests of a vanished provider finish quickly.
        env={"MP_STREAM_IDLE_TIMEOUT_S": "30", "MP_LOG_LEVEL": "info"},
    )
    daemon = spawn_daemon(
        state_dir,
        nats=nats_server,
        provider_id=TINY_PROVIDER,
        model_id=TINY_MODEL,
        model_path=tiny_model_path,
        env={"MP_HEARTBEAT_S": "0.5"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_model(base, TINY_MODEL, timeout=120, daemon=daemon)
        yield Stack(
            home=state_dir,
            base_url=base,
            api_key=api_key,
            nats=nats_server,
            database_url=postgres.url,
            gateway=gateway,
            daemon=daemon,
            model_path=tiny_model_path,
            postgres=postgres,
        )
    finally:
        daemon.stop()
        gateway.stop()


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where converted real models are kept between runs (they take seconds to make)."""
    path = Path(os.environ.get("MP_TEST_CACHE", REPO / ".mp" / "test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def bare_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server of the module's own, no auth: for tests of the bus itself (nats_direct, replies)."""
    server = NatsServer.start(Path(tmp_path_factory.mktemp("nats")) / "nats")
    yield server
    server.stop()
